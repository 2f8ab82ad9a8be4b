"""dqt — distributed quantized training.

Two halves of low-precision training in one toolkit:

* ``dqt.quant``   — quantization-aware training of weights/activations/gradients (model side);
* ``dqt.comm``    — compressed gradient communication as DDP communication hooks (wire side);
* ``dqt.kernels`` — fused kernels (Triton on GPU, fused CPU path) and their torch references;
* ``dqt.train``   — the trainer, distributed environment, data, models, logging, checkpoints.

``import dqt`` touches no device and needs neither CUDA nor triton.
"""

__version__ = "0.1.0"

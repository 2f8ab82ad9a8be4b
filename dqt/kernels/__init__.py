"""Kernels with their pure-torch references (Liger-Kernel style: one file per op family).

* :mod:`dqt.kernels.blockq` — the wire formats of every gradient compressor
  (:mod:`~dqt.kernels.blockq.format`): encode (quantize + pack + error feedback in one pass)
  and decode-and-reduce, as a torch reference (:mod:`~dqt.kernels.blockq.reference`), a fused
  C kernel for CPU tensors (:mod:`~dqt.kernels.blockq.cpu`) and Triton kernels for CUDA
  tensors (:mod:`~dqt.kernels.blockq.triton_impl`), all producing the same bytes;
* :mod:`dqt.kernels.philox` — the counter-based random numbers they share;
* :mod:`dqt.kernels.bitpack` — pure-torch bit packing;
* :mod:`dqt.kernels.lowbit_pack`, :mod:`dqt.kernels.lowbit_gemm` — packed low-bit weights and
  the GEMV/GEMM that multiplies them (Triton on CUDA).

This package imports neither ``dqt.comm`` nor ``dqt.quant``, and nothing here queries a device
or imports triton at import time.
"""

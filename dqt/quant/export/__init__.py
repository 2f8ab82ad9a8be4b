"""Exporting a QAT model: the packed weights, their files and their size.

* :mod:`~dqt.quant.export.codes` — the storage formats a weight quantizer's ``encode`` returns
  (affine, ternary2, log, minifloat, flex, codebooks, ...), each with its bit-exact decoder;
  :mod:`~dqt.quant.export.huffman` sizes Huffman-coded indices;
* :mod:`~dqt.quant.export.convert` — ``convert(model)``: every quantized weight → its codes, plus
  the rest of the state dict; ``load_packed`` installs codes back as dequantizing weights;
* :mod:`~dqt.quant.export.summary` — ``summarize`` / ``format_summary``: the model's size, from
  what ``convert`` writes;
* :mod:`~dqt.quant.export.serialize` — ``save_export`` / ``read_export``: ``model.safetensors`` +
  ``model.json``;
* :mod:`~dqt.quant.export.packed_linear` — ``use_packed_gemm``: a loaded model's affine Linear
  layers through the packed low-bit GEMM;
* :mod:`~dqt.quant.export.integer_inference` — ``to_integer``: a w8a8 model's Linear and Conv2d
  layers in integer arithmetic only (int8 GEMM, int32 bias, fixed-point requantization).

The quantizers (:mod:`dqt.quant.methods`) import :mod:`~dqt.quant.export.codes`, so this package
imports nothing itself; import the submodules.
"""

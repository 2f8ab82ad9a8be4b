"""Run an exported model's affine Linear layers through the packed low-bit GEMM.

An export (:mod:`dqt.quant.export`) stores 1-, 2-, 4- and 8-bit weights in the layout of
:mod:`dqt.kernels.lowbit_pack`, and :func:`~dqt.quant.export.convert.load_packed` gives back
a model whose layers dequantize those codes at every forward. :func:`use_packed_gemm` instead
makes each such ``nn.Linear`` compute ``y = lowbit_linear(x, W_packed) + b`` directly from the
codes (:mod:`dqt.kernels.lowbit_gemm`: Triton GEMV/GEMM on CUDA, the dequantize-then-matmul
reference elsewhere). Its forward pre-hooks — the input-activation quantizers — and forward
hooks still run, because only the module's ``forward`` is replaced.

The result equals the dequantizing model up to fp32 summation order (the tolerance grows with
√K; tested). Formats that are not affine in one code (TTQ's two scales, log, minifloat, flex,
tanh) keep their dequantizing path.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from dqt.kernels.lowbit_gemm import LowBitWeight, lowbit_linear
from dqt.quant.export.convert import PackedWeight


def _packed(module: nn.Module) -> PackedWeight | None:
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    found = [p for p in plist if isinstance(p, PackedWeight)]
    return found[0] if found else None


def _forward(self: nn.Linear, x: Tensor) -> Tensor:
    pw = self._dqt_packed
    w = LowBitWeight(pw.packed, pw.scale, pw.zero, pw.meta["storage_bits"], pw.meta["k"])
    y = lowbit_linear(x, w, impl=self._dqt_impl)
    return y if self.bias is None else y + self.bias.to(y.dtype)


@torch.no_grad()
def use_packed_gemm(model: nn.Module, impl: str = "auto") -> list[str]:
    """Switch every exported affine ``nn.Linear`` of ``model`` to the packed GEMM, in place;
    returns their names. ``impl``: auto (Triton on CUDA), triton or reference."""
    names = []
    for name, m in model.named_modules():
        pw = _packed(m)
        if isinstance(m, nn.Linear) and pw is not None and pw.fmt == "affine":
            if len(m.parametrizations.weight) != 1:
                continue  # another parametrization changes the weight after the codes
            m._dqt_packed, m._dqt_impl = pw, impl
            m.forward = types.MethodType(_forward, m)
            names.append(name)
    return names

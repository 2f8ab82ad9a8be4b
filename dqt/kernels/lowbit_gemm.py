"""Packed low-bit GEMM / GEMV for converted QAT layers: y = x · Wᵀ with W stored as packed codes
(:mod:`dqt.kernels.lowbit_pack`: ``W[n, k] = scale[n]·(code[n, k] − zero[n])``, codes packed
along K into int32, N contiguous).

``lowbit_linear(x, w)`` computes ``y[m, n] = scale[n] · Σ_k x[m, k]·(code[n, k] − zero[n])``
(+ bias): the codes are unpacked in registers, shifted by the zero point — exact small integers
or halves in the activation dtype — multiplied with fp16/bf16/fp32 activations with fp32
accumulation, and the per-channel scale is applied once in the epilogue.

* CUDA tensors → the Triton kernels of :mod:`dqt.kernels.lowbit_gemm_triton` (a GEMV for
  M ≤ 8 that streams the packed weight once, a ``tl.dot`` GEMM above);
* otherwise → the reference: dequantize to fp32, ``torch.matmul``, cast to x's dtype.

The GEMM is checked against the fp32 dequantize-then-matmul reference with a tolerance that
scales with √K (tests/test_kernels_lowbit_gemm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dqt.kernels.lowbit_pack import BITS, dequantize_weight, pack_weight, packed_rows

__all__ = ["LowBitWeight", "lowbit_linear", "lowbit_linear_ref"]


@dataclass
class LowBitWeight:
    """A packed (N, K) weight: ``packed`` int32 (ceil(K/per), N), ``scale`` and ``zero`` (N,)
    fp32, ``bits`` ∈ {1, 2, 4, 8}."""

    packed: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    k: int

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}; got {self.bits}")
        if self.packed.dtype != torch.int32 or self.packed.dim() != 2:
            raise ValueError("packed must be an int32 (rows, N) tensor")
        if self.packed.shape[0] != packed_rows(self.k, self.bits):
            raise ValueError(f"packed has {self.packed.shape[0]} rows; K={self.k} at "
                             f"{self.bits} bits needs {packed_rows(self.k, self.bits)}")
        n = self.packed.shape[1]
        if self.scale.shape != (n,) or self.zero.shape != (n,):
            raise ValueError(f"scale and zero must have shape ({n},)")

    @property
    def n(self) -> int:
        return self.packed.shape[1]

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bits: int) -> "LowBitWeight":
        return cls(pack_weight(codes, bits), scale.float(), zero.float(), bits, codes.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.packed, self.scale, self.zero, self.bits, self.k, dtype)

    def to(self, device: torch.device | str) -> "LowBitWeight":
        return LowBitWeight(self.packed.to(device), self.scale.to(device), self.zero.to(device),
                            self.bits, self.k)

    def nbytes(self) -> int:
        """Bytes read by a kernel: packed codes + fp32 scale and zero."""
        return self.packed.numel() * 4 + 8 * self.n


def lowbit_linear_ref(x: Tensor, w: LowBitWeight, bias: Tensor | None = None) -> Tensor:
    """fp32 dequantize-then-matmul, cast to x's dtype (the reference)."""
    y = x.float() @ w.dequantize(torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def lowbit_linear(x: Tensor, w: LowBitWeight, bias: Tensor | None = None,
                  impl: str = "auto") -> Tensor:
    """y = x·Wᵀ (+ bias) for x (..., K) in fp16/bf16/fp32; ``impl``: auto, triton, reference."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has {x.shape[-1]} features; the weight expects K={w.k}")
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be auto, triton or reference; got {impl!r}")
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda)
    if not use_triton:
        return lowbit_linear_ref(x, w, bias)
    from dqt.kernels import lowbit_gemm_triton

    if not (lowbit_gemm_triton.available(x.device)):
        raise RuntimeError("the Triton low-bit GEMM needs triton and a CUDA tensor (or "
                           "TRITON_INTERPRET=1 set before triton is imported)")
    lead = x.shape[:-1]
    y = lowbit_gemm_triton.matmul(x.reshape(-1, w.k).contiguous(), w)
    if bias is not None:
        y = (y.float() + bias.float()).to(x.dtype)
    return y.reshape(*lead, w.n)

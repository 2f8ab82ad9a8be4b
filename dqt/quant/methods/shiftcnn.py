"""ShiftCNN weights (Gudovskiy & Rigazio 2017, "ShiftCNN: Generalized Low-Precision
Architecture for Inference of Convolutional Neural Networks", arXiv 1706.02393; reference script
gudovskiy/ShiftCNN ``shiftcnn_quantization.py``).

* ``shiftcnn`` — the weights are normalized by max|W| (per layer as in the paper, or per output
  channel: ``per_channel``), r = W / max|W| ∈ [−1, 1], then approximated by a sum of N
  (``terms``) codewords, one from each codebook

      C_n = {0, ±2^(−n+1), ±2^(−n), …, ±2^(−n−⌊M/2⌋+2)},   M = 2^B − 1  (B = ``bits``),

  i.e. M codewords (⌊M/2⌋ = 2^(B−1) − 1 magnitudes), so each term is a B-bit index and each
  weight N·B bits (N = 2, B = 4: C_1 = {0, ±2^0, …, ±2^−6}, C_2 = {0, ±2^−1, …, ±2^−7}; the
  seed's example lists C_1 from 2^−1, one level short of its own formula). Greedy residual
  approximation (the reference script): r_1 = r; for n = 1..N, q_n = sign(r_n)·2^k with k the
  power of two nearest to |r_n| (k = ⌊log2|r_n|⌋, plus one when |r_n| > 1.5·2^⌊log2|r_n|⌋),
  q_n = 0 when k falls below the codebook's smallest exponent −n−⌊M/2⌋+2; r_{n+1} = r_n − q_n.
  Ŵ = max|W| · Σ_n q_n. Multiplications by Ŵ become N shifts and adds.

  The paper uses it without retraining (post-training: ``launch/bench_ptq.py``); as a QAT
  quantizer it fine-tunes through the identity STE.

Export: ``shift`` codes (N B-bit indices per weight, packed) and the per-row scale max|W|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, amax, need, register, to_rows
from dqt.quant.export.codes import Shift
from dqt.quant.ste import ste


@register
class ShiftCNN(Quantizer):
    name = "shiftcnn"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 4
        """B: M = 2^B − 1 codewords per codebook, 2..8."""
        terms: int = 2
        """N: power-of-two codewords summed per weight, 1..4."""
        per_channel: bool = False
        """Normalize by max|W| per output channel instead of per layer."""

        def __post_init__(self) -> None:
            b, t = self.bits, self.terms
            need(2 <= b <= 8, "bits", f"must be in [2, 8] (M = 2^B − 1 codewords); got {b}")
            need(1 <= t <= 4, "terms", f"must be in [1, 4]; got {t}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.terms, self.per_channel = c.bits, c.terms, c.per_channel

    def scale(self, w: Tensor) -> Tensor:
        return amax(w.detach(), self.per_channel).clamp(min=torch.finfo(torch.float32).tiny)

    def split(self, w: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """([q_1..q_N] fp32 like w, [codes_1..codes_N] uint8, scale)."""
        s = self.scale(w)
        r = w.detach() / s
        half = 2 ** (self.bits - 1) - 1  # ⌊M/2⌋
        qs, codes = [], []
        for n in range(1, self.terms + 1):
            a = r.abs()
            mant, ex = torch.frexp(a)  # a = mant·2^ex, mant ∈ [0.5, 1)
            k = ex - 1 + (2 * mant > 1.5).to(ex.dtype)
            k = torch.clamp(k, max=1 - n)  # |r_n| ≤ 2^(1−n) already; keeps codes in range
            zero = (a == 0) | (k < 2 - n - half)
            q = torch.where(zero, torch.zeros_like(a), torch.sign(r) * torch.exp2(k.float()))
            j = torch.where(zero, torch.zeros_like(k), 2 - n - k)
            codes.append(torch.where(r < 0, j + half * (j > 0).to(j.dtype), j).to(torch.uint8))
            qs.append(q)
            r = r - q
        return qs, codes, s

    def quantize(self, w: Tensor) -> Tensor:
        qs, _, s = self.split(w)
        total = qs[0]
        for q in qs[1:]:
            total = total + q
        return ste(w, total * s)

    def encode(self, w: Tensor) -> Shift:
        _, codes, s = self.split(w)
        n = w.shape[0]
        return Shift(torch.stack([c.reshape(n, -1) for c in codes], dim=1), to_rows(s, w),
                     self.bits)

    def storage_bits(self) -> Optional[float]:
        return float(self.bits * self.terms)

"""Balanced quantization of weights.

Zhou, Wang, Wen, He & Zou, "Balanced Quantization: An Effective and Efficient Approach to
Quantized Neural Networks", JCST 2017, arXiv 1706.07145.

Uniform quantization set by the extremes leaves most of a bell-shaped weight distribution in a
few middle levels. Balanced quantization first *equalizes* the weights — a piecewise-linear
histogram equalization whose pieces are the 2^k bins of a recursive percentile partition — and
then quantizes uniformly, so every one of the 2^k levels holds the same share of the weights:

1. partition: split the weights at their median, split each half at its median, … k times;
   edges e_0 = min W < e_1 < … < e_{2^k} = max W (``approx: mean`` splits each part at its
   *mean* instead — the paper's cheaper approximation of the percentile, no sort needed);
2. equalize: w in bin i, e_i ≤ w < e_{i+1}, maps to (i + (w − e_i)/(e_{i+1} − e_i)) / 2^k ∈ [0, 1];
3. uniform quantization with 2^k levels: code c = min(⌊2^k·v⌋, 2^k − 1) — which is exactly the
   bin index i (so the code is computed as the bin index);
4. the codes map to uniform, zero-symmetric levels u_c = (2c + 1 − 2^k)/2^k ∈ (−1, 1), scaled by
   the per-tensor least-squares α = ⟨W, u⟩/⟨u, u⟩ (the MSE-optimal scale of those levels —
   dqt's choice of the one scale factor): W_q = α·u_c.

Backward: identity STE (∂L/∂W = ∂L/∂W_q), as in the paper. Per tensor (the paper's granularity).
Export: ``affine`` k-bit codes c, scale 2α/2^k, zero (2^k − 1)/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Affine
from dqt.quant.ste import ste

APPROX = ("median", "mean")


def _split(seg: Tensor, approx: str) -> Tensor:
    """The value a sorted segment is split at: its median (the middle element, or the mean of
    the two middle ones — numpy's and torch.quantile's linear interpolation) or its mean."""
    if approx == "mean":
        return seg.mean()
    n = seg.numel()
    return (seg[(n - 1) // 2] + seg[n // 2]) / 2


def balanced_edges(w: Tensor, bits: int, approx: str = "median") -> Tensor:
    """The 2^bits − 1 inner edges of the recursive percentile partition of ``w`` (ascending)."""
    s = w.detach().reshape(-1).float().sort().values
    segs = [(0, s.numel())]
    inner: list[list[Tensor]] = [[] for _ in range(bits)]
    for depth in range(bits):
        nxt = []
        for a, b in segs:
            m = _split(s[a:b], approx) if b > a else s[max(a - 1, 0)]
            cut = a + int(torch.searchsorted(s[a:b], m, right=False)) if b > a else a
            inner[depth].append(m)
            nxt += [(a, cut), (cut, b)]
        segs = nxt
    # interleave the depths into ascending order: edge j of 2^k − 1 sits at depth of its
    # lowest set bit (the root median is the middle edge)
    n = 1 << bits
    edges = []
    for j in range(1, n):
        tz = (j & -j).bit_length() - 1  # trailing zeros
        depth = bits - 1 - tz
        edges.append(inner[depth][j >> (tz + 1)])
    return torch.stack(edges)


@register
class Balanced(Quantizer):
    name = "balanced"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 2
        """Bit-width k: 2^k equally populated levels, 1..8."""
        approx: str = "median"
        """Split each part at its median (exact percentiles) or its mean (the cheap variant)."""

        def __post_init__(self) -> None:
            b, a = self.bits, self.approx
            need(1 <= b <= 8, "bits", f"must be in [1, 8]; got {b}")
            need(a in APPROX, "approx", f"must be one of {', '.join(APPROX)}; got {a!r}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.approx = self.cfg.bits, self.cfg.approx

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(codes c ∈ [0, 2^k), scale 2α/2^k, zero (2^k − 1)/2), scale and zero fp32 scalars."""
        w = w.detach()
        n = 1 << self.bits
        c = torch.bucketize(w, balanced_edges(w, self.bits, self.approx).to(w.device), right=True)
        zero = torch.tensor((n - 1) / 2, dtype=torch.float32, device=w.device)
        u = c.float() - zero  # ∝ the uniform level (2c + 1 − 2^k)/2^k
        alpha2 = (w * u).sum() / (u * u).sum().clamp(min=1e-30)  # least squares on u
        return c, alpha2, zero

    def quantize(self, w: Tensor) -> Tensor:
        c, scale, zero = self.codes(w)
        return ste(w, scale * (c.float() - zero))

    def encode(self, w: Tensor) -> Affine:
        c, scale, zero = self.codes(w)
        n = w.shape[0]
        return Affine(c.reshape(n, -1).to(torch.uint8), scale.expand(n).clone(),
                      zero.expand(n).clone(), self.bits)

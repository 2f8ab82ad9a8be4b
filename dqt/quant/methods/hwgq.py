"""Half-wave Gaussian quantization of activations (HWGQ).

Cai, He, Sun & Vasconcelos, "Deep Learning with Low Precision by Half-wave Gaussian
Quantization", CVPR 2017, arXiv 1702.00953.

The input of a layer (a batch-normalized dot product through a ReLU) is modelled as a
half-wave rectified N(0, 1). The quantizer (eq. 5 of the paper) is

    Q(x) = q_i  for x ∈ (t_i, t_{i+1}],   Q(x) = 0  for x ≤ 0,

with m = 2^bits − 1 positive levels q_1 < … < q_m, thresholds t_1 = 0, t_i = (q_{i−1} + q_i)/2
(i = 2..m), t_{m+1} = ∞ — every positive input maps to at least q_1. The levels minimize
E[(x − Q(x))²] over x ~ N(0, 1), x > 0, found by Lloyd's algorithm with the truncated-normal
moments (centroid of (a, b]: (φ(a) − φ(b))/(Φ(b) − Φ(a))):

* ``uniform`` (default, the quantizer the paper trains with): q_i = iΔ; given the partition the
  optimal step is Δ = Σᵢ i·M1ᵢ / Σᵢ i²·M0ᵢ (M0ᵢ, M1ᵢ the mass and first moment of cell i).
  Δ(1 bit) = √(2/π) = 0.798, Δ(2 bits) = 0.5388 — the paper's 0.538 —, Δ(3 bits) = 0.3217
  (``tests/test_quant_hwgq.py``);
* ``uniform: false``: free levels, qᵢ = centroid of cell i (the non-uniform Lloyd-Max quantizer).

Backward: the paper's clipped-ReLU STE, ∂Q/∂x = 1 on 0 < x ≤ q_m, 0 elsewhere.

In dqt the quantizer acts on a layer's input, i.e. after BN → ReLU (→ max-pool): Q is 0 on
x ≤ 0 and non-decreasing, so Q(ReLU(x)) = Q(x) and Q(maxpool(x)) = maxpool(Q(x)) — the same
as the paper's Q in place of the ReLU right after the BatchNorm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register


def _phi(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: float) -> float:
    return 1.0 if math.isinf(x) else 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _cells(levels: list[float]) -> list[tuple[float, float, float]]:
    """(mass M0, first moment M1, second moment M2) of N(0,1) on each cell (t_i, t_{i+1}]."""
    t = [0.0] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [math.inf]
    out = []
    for a, b in zip(t, t[1:]):
        m0 = _cdf(b) - _cdf(a)
        m1 = _phi(a) - _phi(b)
        m2 = m0 + a * _phi(a) - (0.0 if math.isinf(b) else b * _phi(b))
        out.append((m0, m1, m2))
    return out


def half_gaussian_mse(levels: list[float]) -> float:
    """E[(x − Q(x))²; x > 0] for x ~ N(0, 1) (the x ≤ 0 half maps to 0 without error)."""
    return sum(m2 - 2 * q * m1 + q * q * m0 for q, (m0, m1, m2) in zip(levels, _cells(levels)))


@lru_cache(maxsize=None)
def hwgq_levels(bits: int, uniform: bool = True, tol: float = 1e-12,
                max_iter: int = 100000) -> tuple[float, ...]:
    """The m = 2^bits − 1 positive levels of the optimal half-wave Gaussian quantizer."""
    m = (1 << bits) - 1
    levels = [3.0 * (i + 1) / m for i in range(m)]
    for _ in range(max_iter):
        cells = _cells(levels)
        if uniform:
            step = sum((i + 1) * c[1] for i, c in enumerate(cells)) / \
                sum((i + 1) ** 2 * c[0] for i, c in enumerate(cells))
            new = [step * (i + 1) for i in range(m)]
        else:
            new = [c[1] / c[0] if c[0] > 0 else q for q, c in zip(levels, cells)]
        done = max(abs(a - b) for a, b in zip(new, levels)) < tol
        levels = new
        if done:
            break
    return tuple(levels)


@register
class HWGQ(Quantizer):
    name = "hwgq"
    kinds = ("act",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 2
        """Bit-width: 2^bits − 1 positive levels, 1..8."""
        uniform: bool = True
        """Uniform levels iΔ (the paper's); false: the non-uniform Lloyd-Max levels."""

        def __post_init__(self) -> None:
            need(1 <= self.bits <= 8, "bits", f"must be in [1, 8]; got {self.bits}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.uniform = self.cfg.bits, self.cfg.uniform
        lv = hwgq_levels(self.bits, self.uniform)
        self.register_buffer("levels", torch.tensor((0.0, *lv)), persistent=False)
        self.register_buffer("thresholds", torch.tensor(
            [(a + b) / 2 for a, b in zip(lv, lv[1:])]), persistent=False)

    def quantize(self, x: Tensor) -> Tensor:
        lv = self.levels.to(x.device)
        # code i ∈ [1, m] for x ∈ (t_i, t_{i+1}] (bucketize right=False: t_{i} < x ≤ t_{i+1})
        code = torch.bucketize(x.detach(), self.thresholds.to(x.device), right=False) + 1
        code = torch.where(x.detach() > 0, code, torch.zeros_like(code))
        q = lv[code]
        mask = ((x > 0) & (x <= lv[-1])).to(x.dtype).detach()
        f = x * mask  # gradient exactly the clipped-ReLU mask
        return q - (f.detach() - f)

    def unsigned_range(self) -> Optional[str]:
        return "[0, q_m] (half-wave)"

"""Fixed-point factorized weights — FFN (Wang & Cheng, CVPR 2017, arXiv 1611.01972,
"Fixed-point Factorized Networks").

``ffn`` (weights): the weight as W (N, K) (conv weights flattened to in·kh·kw) is approximated by

    W ≈ X·D·Yᵀ,   X ∈ {−1, 0, 1}^{N×r},  Y ∈ {−1, 0, 1}^{K×r},  D = diag(d₁ … d_r)

found, as in the paper, by the semi-discrete decomposition (SDD; Kolda & O'Leary 1998): r greedy
rank-1 terms, each fitted to the residual R = W − Σ_{j<i} d_j x_j y_jᵀ by alternating ternary
updates (at most ``iters`` of them — fewer once x and y stop changing, a fixed point — starting
from y = e_c, c the column of R with the largest norm):

* x ← argmax_{x ∈ {−1,0,1}^N} (xᵀRy)² / ‖x‖², solved exactly by sorting: with s = Ry and
  |s|_(1) ≥ |s|_(2) ≥ …, take the J entries with the largest |s| where J maximizes
  (Σ_{i≤J} |s|_(i))² / J, and x_i = sign(s_i) on them (0 elsewhere);
* y ← the same with s = Rᵀx;
* d = xᵀRy / (‖x‖²·‖y‖²).

r = ``rank`` (null: min(N, K)). The decomposition is a deterministic function of W (stable sort,
first maximum), so it is identical on every rank; it is recomputed whenever W changes (every step;
memoized for eval). Backward: identity STE.

Simplifications: the paper then recovers pseudo-full-precision factors X̃, Ỹ (whose ternarization
gives X, Y), balances their scales and fine-tunes them; here the full-precision W itself keeps
training through the STE and is re-decomposed after every step.

Export: ``factored`` codes (X and Y as packed 2-bit codes, D fp32); decode is X·diag(D)·Yᵀ by the
same fp32 matmul as the forward pass, so it is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Factored, factored_decode
from dqt.quant.ste import ste


def ternary_max(s: np.ndarray) -> np.ndarray:
    """argmax over x ∈ {−1, 0, 1}ⁿ \\ {0} of (xᵀs)² / ‖x‖² (ties: the fewest nonzeros)."""
    order = np.argsort(-np.abs(s), kind="stable")
    csum = np.cumsum(np.abs(s)[order])
    j = int(np.argmax(csum * csum / np.arange(1, s.size + 1, dtype=s.dtype)))
    x = np.zeros_like(s)
    top = order[: j + 1]
    x[top] = np.sign(s[top])
    return x


def sdd(w: Tensor, rank: int, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Semi-discrete decomposition W ≈ X·diag(d)·Yᵀ → (X (N, r), d (r,), Y (K, r)).

    Runs in numpy on the CPU (fp32): a few thousand tiny sequential steps, where torch's
    per-op overhead would dominate."""
    r_ = w.detach().cpu().float().numpy().copy()
    n, k = r_.shape
    xs = np.zeros((n, rank), np.float32)
    ys = np.zeros((k, rank), np.float32)
    ds = np.zeros(rank, np.float32)
    for i in range(rank):
        y = np.zeros(k, np.float32)
        y[int(np.argmax((r_ * r_).sum(0)))] = 1.0
        x = ternary_max(r_ @ y)
        for _ in range(iters):
            y2 = ternary_max(r_.T @ x)
            x2 = ternary_max(r_ @ y2)
            done = np.array_equal(x2, x) and np.array_equal(y2, y)  # a fixed point
            x, y = x2, y2
            if done:
                break
        nxy = float(x @ x) * float(y @ y)
        d = np.float32(x @ r_ @ y / nxy) if nxy > 0 else np.float32(0.0)
        r_ -= d * np.outer(x, y)
        xs[:, i], ys[:, i], ds[i] = x, y, d
    dev = w.device
    return (torch.from_numpy(xs).to(dev), torch.from_numpy(ds).to(dev),
            torch.from_numpy(ys).to(dev))


@register
class FFN(Quantizer):
    name = "ffn"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        rank: Optional[int] = None
        """r: ternary rank-1 terms, >= 1 (null: min(N, K))."""
        iters: int = 10
        """At most this many alternating updates per term, 1..1000."""

        def __post_init__(self) -> None:
            r, i = self.rank, self.iters
            need(r is None or r >= 1, "rank", f"must be >= 1 (or null: min(N, K)); got {r}")
            need(1 <= i <= 1000, "iters", f"must be in [1, 1000]; got {i}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.rank, self.iters = self.cfg.rank, self.cfg.iters
        self._memo: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None

    def storage_bits(self) -> Optional[float]:
        return None  # depends on the layer's shape: the export's meta has it

    def factors(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w2 = w.detach().reshape(w.shape[0], -1)
        m = self._memo
        if m is not None and m[0].shape == w2.shape and torch.equal(m[0], w2):
            return m[1], m[2], m[3]
        r = min(w2.shape) if self.rank is None else self.rank
        x, d, y = sdd(w2, r, self.iters)
        self._memo = (w2.clone(), x, d, y)
        return x, d, y

    def quantize(self, w: Tensor) -> Tensor:
        x, d, y = self.factors(w)
        return ste(w, factored_decode(x, d, y).reshape(w.shape))

    def encode(self, w: Tensor) -> Factored:
        x, d, y = self.factors(w)
        return Factored(x.to(torch.int8), d.float(), y.to(torch.int8))

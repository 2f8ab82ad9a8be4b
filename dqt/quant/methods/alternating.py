"""Alternating multi-bit quantization of weights (AQN).

Xu, Wang, Zhu, Lin, Zhang, Liu & Zha, "Alternating Multi-bit Quantization for Recurrent Neural
Networks", ICLR 2018, arXiv 1802.00150.

Each output row w ∈ R^n of a weight (a Linear's row, a conv's filter) is approximated by k
binary vectors:  w ≈ Σ_{i=1..k} αᵢ bᵢ,  bᵢ ∈ {−1, +1}^n,  found by alternating minimization of
‖w − Bα‖² (B = [b₁ … b_k] ∈ {±1}^{n×k}):

* init (greedy, the paper's starting point): r ← w; for i = 1..k: αᵢ = mean|r|, bᵢ = sign(r),
  r ← r − αᵢbᵢ;
* ``iters`` alternations (the paper: two are enough), each
  - α-step: α = (BᵀB)⁻¹Bᵀw (least squares; pseudo-inverse when BᵀB is singular);
  - B-step: with α fixed, each entry independently takes the nearest of the 2^k values
    v = Σᵢ αᵢsᵢ (s ∈ {±1}^k): the values are sorted and each entry is placed by binary search
    over the midpoints of consecutive values (the paper's binary search tree).

The forward value is the row's table of the 2^k sums indexed by each entry's code, so it is
exactly what the ``codebook`` export decodes. Backward: identity STE (the paper trains the
real weights with the straight-through estimator).

The paper targets recurrent nets (LSTM/GRU gate matrices) and their input/output projections:
every one of them is an ``nn.Linear``, so attaching ``aqn`` to Linear layers — dqt's GPT model
included (``tests/test_quant_aqn.py``) — is the paper's setting; conv filters work the same way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Codebook, codebook_decode
from dqt.quant.ste import sign, ste


def sign_patterns(k: int, device: Any = None) -> Tensor:
    """All 2^k vectors s ∈ {±1}^k, (2^k, k)."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=k)), device=device)


def alternating_quantize(w2: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """w2 (N, K) fp32 → (codes (N, K) int64 into the sorted table, table (N, 2^k) ascending)."""
    n = w2.shape[0]
    r = w2.clone()
    alphas, bs = [], []
    for _ in range(k):  # greedy initialisation
        a = r.abs().mean(dim=1, keepdim=True)
        b = sign(r)
        alphas.append(a)
        bs.append(b)
        r = r - a * b
    alpha = torch.cat(alphas, dim=1)  # (N, k)
    B = torch.stack(bs, dim=2)  # (N, K, k)
    s = sign_patterns(k, w2.device)  # (2^k, k)
    table, codes, _ = _b_step(w2, alpha, s)
    for _ in range(iters):
        btb = B.transpose(1, 2) @ B  # (N, k, k)
        btw = B.transpose(1, 2) @ w2.unsqueeze(-1)  # (N, k, 1)
        alpha = (torch.linalg.pinv(btb) @ btw).squeeze(-1)
        table, codes, order = _b_step(w2, alpha, s)
        B = s[torch.gather(order, 1, codes)]  # (N, K, k): the sign pattern of each entry
    return codes, table


def _b_step(w2: Tensor, alpha: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted table of Σαᵢsᵢ per row (N, 2^k), each entry's index of the nearest value (binary
    search over the midpoints), and the sign pattern behind each sorted position."""
    table, order = (alpha @ s.t()).sort(dim=1, stable=True)
    mids = (table[:, 1:] + table[:, :-1]) / 2
    codes = torch.searchsorted(mids.contiguous(), w2.contiguous(), right=False)
    return table, codes, order


@register
class AQN(Quantizer):
    name = "aqn"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 2
        """k: the binary vectors per row, 1..4."""
        iters: int = 2
        """Alternations of the α- and B-steps after the greedy start, 0..20."""

        def __post_init__(self) -> None:
            b, i = self.bits, self.iters
            need(1 <= b <= 4, "bits", f"must be in [1, 4]; got {b}")
            need(0 <= i <= 20, "iters", f"must be in [0, 20]; got {i}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.iters = self.cfg.bits, self.cfg.iters

    def _codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        w2 = w.detach().reshape(w.shape[0], -1).float()
        return alternating_quantize(w2, self.bits, self.iters)

    def quantize(self, w: Tensor) -> Tensor:
        codes, table = self._codes(w)
        return ste(w, codebook_decode(codes, table).reshape(w.shape))

    def encode(self, w: Tensor) -> Codebook:
        codes, table = self._codes(w)
        return Codebook(codes.to(torch.uint8), table, self.bits)

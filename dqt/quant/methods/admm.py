"""Extremely low-bit weights by ADMM.

Leng, Dou, Li, Zhu & Jin, "Extremely Low Bit Neural Network: Squeeze the Last Bit Out with
ADMM", AAAI 2018, arXiv 1707.09870.

Training is the constrained problem min f(W) s.t. W ∈ C = {a·Q : a > 0, Q ∈ S^n} with one scale
a per layer and the code set S (``bits``): 1 → {−1, +1} (binary), 2 → {−1, 0, +1} (ternary),
3 → {0, ±1, ±2, ±4}, 4 → {0, ±1, ±2, …, ±64} (powers of two: the multiplications become
shifts). With an auxiliary G and the scaled dual λ, ADMM alternates

* W-step: minimize f(W) + (ρ/2)‖W − G + λ‖² in the real space — the optimizer's ordinary step
  with ρ(W − G + λ) added to the weight's gradient (:meth:`ADMM.add_penalty_grad`, called by
  ``dqt.quant.prepare.qat_penalty`` after the gradients are all-reduced and unscaled, before
  clipping and the step);
* G-step (every ``every`` optimizer steps, :meth:`ADMM.after_step`): G ← Proj_C(W + λ), the
  projection by alternating updates: a = ⟨V, Q⟩/⟨Q, Q⟩ and Q = round-to-S(V/a) (nearest
  element of S), starting from a = mean|V| and iterated ``iters`` times;
* dual step: λ ← λ + W − G.

Forward: as in the paper, the W-step trains the full-precision W (``ste: false``, the default),
and the model that is evaluated and exported is the projected one: in eval mode the layer uses
G. ``ste: true`` uses G in the training forward too, with the identity STE (a variant, not the
paper's). G (stored as its codes and the scale a) and λ are buffers: checkpointed, and identical
on every rank, since they are a deterministic function of W (identical after the all-reduced
step). ``fold_bn`` is not supported (the folded weight moves with the BN statistics).
Export: ``codebook`` — codes into the layer's table a·S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Codebook, codebook_decode
from dqt.quant.ste import ste


def code_set(bits: int) -> list[float]:
    """The sorted unit levels S of ``bits``."""
    if bits == 1:
        return [-1.0, 1.0]
    mags = [2.0 ** j for j in range((1 << (bits - 1)) - 1)]
    return sorted([-m for m in mags] + [0.0] + mags)


def project(v: Tensor, levels: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Proj onto {a·Q}: (codes into ``levels`` (int64, v's shape), a (fp32 scalar))."""
    mids = (levels[1:] + levels[:-1]) / 2
    a = v.abs().mean().clamp(min=1e-12)
    codes = torch.bucketize(v / a, mids)
    for _ in range(iters):
        q = levels[codes]
        a = ((v * q).sum() / (q * q).sum().clamp(min=1e-30)).clamp(min=1e-12)
        codes = torch.bucketize(v / a, mids)
    return codes, a


@register
class ADMM(Quantizer):
    name = "admm"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 2
        """The code set S: 1 binary, 2 ternary, 3 {0, ±1, ±2, ±4}, 4 {0, ±1, …, ±64}."""
        rho: float = 0.3
        """The penalty ρ of (ρ/2)‖W − G + λ‖², >= 0."""
        every: int = 20
        """Optimizer steps between the G and λ updates, >= 1."""
        iters: int = 5
        """Alternating updates of the projection onto {a·Q}, 1..100."""
        ste: bool = False
        """Train with G in the forward pass (identity STE) instead of W, the paper's."""

        def __post_init__(self) -> None:
            b, r, e, i = self.bits, self.rho, self.every, self.iters
            need(1 <= b <= 4, "bits", f"must be in [1, 4]; got {b}")
            need(r >= 0, "rho", f"must be >= 0; got {r}")
            need(e >= 1, "every", f"must be >= 1; got {e}")
            need(1 <= i <= 100, "iters", f"must be in [1, 100]; got {i}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.rho, self.every, self.iters, self.ste = (c.bits, c.rho, c.every, c.iters,
                                                                 c.ste)
        self.register_buffer("levels", torch.tensor(code_set(c.bits)), persistent=False)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("codes", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("lam", torch.zeros(0))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ state
    def init_from(self, w: Tensor) -> None:
        if self.layer is not None and parametrize.is_parametrized(self.layer, "weight"):
            raise ValueError("admm: qat.fold_bn is not supported (the folded weight moves with "
                             "the BatchNorm statistics, so W, G and λ would not be comparable)")
        self.lam = torch.zeros_like(w, dtype=torch.float32)
        self.codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        self._project(w.detach().float())

    def _project(self, v: Tensor) -> None:
        codes, a = project(v, self.levels.to(v.device), self.iters)
        self.codes.copy_(codes.to(torch.uint8))
        self.scale.copy_(a)

    def table(self) -> Tensor:
        """(N, |S|) fp32: a·S for every row."""
        n = self.codes.shape[0]
        return (self.scale * self.levels.to(self.scale.device)).expand(n, -1)

    def projected(self) -> Tensor:
        """G = a·S[codes] (the value the ``codebook`` export decodes)."""
        n = self.codes.shape[0]
        return codebook_decode(self.codes.reshape(n, -1), self.table()).reshape(self.codes.shape)

    # ------------------------------------------------------------------ ADMM
    def add_penalty_grad(self, weight: Tensor) -> None:
        if self.rho == 0 or weight.grad is None:
            return
        w = weight.detach().float()
        weight.grad.add_((self.rho * (w - self.projected() + self.lam)).to(weight.grad.dtype))

    def after_step(self, weight: Optional[Tensor]) -> None:
        if weight is None:
            return
        self.count += 1
        if int(self.count) % self.every:
            return
        w = weight.detach().float()
        self._project(w + self.lam)  # G ← Proj(W + λ)
        self.lam.add_(w - self.projected())  # λ ← λ + W − G

    # ------------------------------------------------------------------ forward / export
    def quantize(self, w: Tensor) -> Tensor:
        if self.training and not self.ste:
            return w
        return ste(w, self.projected().to(w.device))

    def storage_bits(self) -> Optional[float]:
        return self.bits

    def encode(self, w: Tensor) -> Codebook:
        n = self.codes.shape[0]
        return Codebook(self.codes.reshape(n, -1).clone(), self.table().clone(), self.bits)

"""Quantizers with learned ranges.

* ``lsq`` — Learned Step Size Quantization (Esser et al., ICLR 2020; zhutmost/lsq-net
  ``quan/quantizer/lsq.py``): v̂ = round(clip(v/s, −Q_N, Q_P))·s with a trainable step s.
  Weights are signed (Q_N = 2^(b−1), Q_P = 2^(b−1) − 1), activations unsigned (Q_N = 0,
  Q_P = 2^b − 1, the inputs follow a ReLU). Gradients: ∂v̂/∂v = 1{−Q_N ≤ v/s ≤ Q_P};
  ∂v̂/∂s = −v/s + round(v/s) inside, −Q_N below, Q_P above, scaled by g = 1/√(N·Q_P)
  (N = weights of the layer, or features per sample for activations).
  s₀ = 2·mean|v|/√Q_P: from the weights at ``prepare``; for activations from the first training
  batch — the largest value over the ranks, committed by ``qat_step`` so s is identical on
  every rank (until then each rank uses its own batch's s₀).
* ``pact`` — PACT (Choi et al. 2018, arXiv 1805.06085): y = clip(x, 0, α) = ½(|x| − |x − α| + α),
  y_q = round(y·(2^k − 1)/α)·α/(2^k − 1), α trainable (start ``init`` = 10 as in the paper),
  ∂y_q/∂α = 1{x ≥ α}, ∂y_q/∂x = 1{0 ≤ x < α}. PACT's L2 penalty on α is the optimizer's
  ``weight_decay`` (α is an ordinary parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dqt.quant.base import Quantizer, need, register, to_rows
from dqt.quant.export.codes import Affine
from dqt.quant.ste import grad_scale, round_ste


def _check_bits(bits: int) -> None:
    need(2 <= bits <= 8, "bits", f"must be in [2, 8]; got {bits}")


def _check_init(init: Optional[float]) -> None:
    need(init is None or init > 0, "init", f"must be > 0; got {init}")


@register
class LSQ(Quantizer):
    name = "lsq"
    stateful = True

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 4
        """Bit-width b, 2..8 (weights signed, activations unsigned)."""
        per_channel: bool = False
        """Weights: one step s per output channel (activations: per tensor)."""
        init: Optional[float] = None
        """The initial step s₀, > 0 (null: 2·mean|v|/√Q_P from the weights, or from the first
        training batch for activations)."""

        def __post_init__(self) -> None:
            _check_bits(self.bits)
            _check_init(self.init)

        def check_kind(self, kind: str) -> None:
            need(not (kind == "act" and self.per_channel), "per_channel",
                 "activations are quantized per tensor")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        bits, init = self.cfg.bits, self.cfg.init
        self.bits, self.per_channel, self.init = bits, self.cfg.per_channel, init
        signed = kind == "weight"
        self.qn = 2 ** (bits - 1) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        self.s = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.tensor(init is not None))
        if init is not None:
            with torch.no_grad():
                self.s.fill_(init)
        self._pending: Optional[Tensor] = None

    def s0(self, v: Tensor) -> Tensor:
        if self.per_channel:
            n = v.shape[0]
            m = v.detach().abs().reshape(n, -1).mean(dim=1).reshape(n, *([1] * (v.dim() - 1)))
        else:
            m = v.detach().abs().mean()
        return (2 * m / math.sqrt(self.qp)).clamp(min=1e-8)

    def init_from(self, w: Tensor) -> None:
        if self.init is None:
            with torch.no_grad():
                self.s.data = self.s0(w).clone()
            self.initialized.fill_(True)

    def step(self, v: Tensor) -> Tensor:
        """The step in use, with LSQ's gradient scale (and the batch s₀ before init)."""
        n = v[0].numel() if (self.kind == "act" or self.per_channel) else v.numel()
        s = grad_scale(self.s, 1.0 / math.sqrt(n * self.qp))
        if self.kind == "act":
            if self.recording and not bool(self.initialized):
                self._pending = self.s0(v).reshape(1).float()
            s = torch.where(self.initialized, s, self.s0(v))
        return s

    def quantize(self, v: Tensor) -> Tensor:
        s = self.step(v)
        return round_ste(torch.clamp(v / s, -self.qn, self.qp)) * s

    def unsigned_range(self) -> Optional[str]:
        return "[0, Q_P·s]" if self.qn == 0 else None

    def encode(self, w: Tensor) -> Affine:
        s = self.s.detach()
        q = torch.round(torch.clamp(w / s, -self.qn, self.qp)) + self.qn
        n = w.shape[0]
        return Affine(q.reshape(n, -1).to(torch.uint8), to_rows(s, w),
                      torch.full((n,), float(self.qn)), self.bits)

    def stats(self) -> Optional[Tensor]:
        if self.kind != "act":
            return None
        out = self._pending if self._pending is not None else torch.full((1,), -float("inf"))
        self._pending = None
        return out

    def commit(self, stats: Tensor) -> None:
        if self.kind == "act" and not bool(self.initialized) and bool(torch.isfinite(stats).all()):
            with torch.no_grad():
                self.s.fill_(float(stats[0]))
            self.initialized.fill_(True)


class _PACTFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, bits: int) -> Tensor:
        ctx.save_for_backward(x, alpha)
        n = float(2 ** bits - 1)
        y = torch.minimum(torch.clamp(x, min=0.0), alpha)
        return torch.round(y * n / alpha) * alpha / n

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        x, alpha = ctx.saved_tensors
        inside = (x >= 0) & (x < alpha)
        return g * inside, (g * (x >= alpha)).sum().reshape(alpha.shape), None


@register
class PACT(Quantizer):
    name = "pact"
    kinds = ("act",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 4
        """Bit-width k, 2..8."""
        init: float = 10.0
        """The initial clip α₀, > 0 (the paper's 10)."""

        def __post_init__(self) -> None:
            _check_bits(self.bits)
            _check_init(self.init)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.init = self.cfg.bits, self.cfg.init
        self.alpha = nn.Parameter(torch.tensor(float(self.init)))

    def quantize(self, x: Tensor) -> Tensor:
        return _PACTFn.apply(x, self.alpha.clamp(min=1e-4), self.bits)

    def unsigned_range(self) -> Optional[str]:
        return "[0, α]"

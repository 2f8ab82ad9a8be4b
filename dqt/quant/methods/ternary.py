"""Ternary weights.

* ``twn`` — Ternary Weight Networks (Li, Zhang & Liu 2016, arXiv 1605.04711): Δ = 0.7·mean|W|
  (``threshold`` = 0.7), t = sign(W)·1{|W| > Δ}, α = mean_{|W| > Δ} |W|, W_t = α·t; per layer
  (``per_channel``: per output channel); identity STE (∂C/∂W = ∂C/∂W_t).
* ``ttq`` — Trained Ternary Quantization (Zhu, Han, Mao & Dally, ICLR 2017; czhu95/ternarynet,
  tensorpack ``ternarize``): Δ = t·max|W| (``threshold`` t = 0.05), W_t = W_p on I_p = {W > Δ},
  0 on |W| ≤ Δ, −W_n on I_n = {W < −Δ}; W_p, W_n trainable per layer. Gradients (as both
  reference implementations compute them): ∂L/∂W_p = Σ_{I_p} g, ∂L/∂W_n = −Σ_{I_n} g (the
  paper prints the latter without the sign of W_t = −W_n), and ∂L/∂W = W_p·g on I_p, 1·g on the
  zero set, W_n·g on I_n. W_p, W_n start at ``init``; null (default) starts them at TWN's α of
  the initial weights (mean |W| above Δ) so a from-scratch layer keeps its scale — the
  references start at 1.0 from a pretrained, normalized model.
* ``absmean`` — BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764): γ = mean|W| per tensor,
  W_q = clamp(round(W/(γ + ε)), −1, 1)·γ, ε = 1e−5, so every weight is −γ, 0 or γ (TWN's
  threshold and scale differ: Δ = 0.5·γ here, α = γ). Identity STE, as BitNet's
  ``w + (w_q − w).detach()``.

Export: TWN and absmean as 2-bit ``affine`` codes t + 1 (zero 1, scale α or γ); TTQ as
``ternary2`` (codes t + 1, W_p and W_n).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dqt.quant.base import Quantizer, need, register, to_rows
from dqt.quant.export.codes import Affine, Ternary2
from dqt.quant.ste import ste


def _check_threshold(t: float, hi: float) -> None:
    need(0 < t < hi, "threshold", f"must be in (0, {hi}); got {t}")


@register
class TWN(Quantizer):
    name = "twn"
    kinds = ("weight",)
    bits = 2

    @dataclass
    class Config(Quantizer.Config):
        threshold: float = 0.7
        """Δ = threshold·mean|W|, in (0, 10.0) (the paper's 0.7)."""
        per_channel: bool = False
        """Δ and α per output channel instead of per layer."""

        def __post_init__(self) -> None:
            _check_threshold(self.threshold, 10.0)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.threshold, self.per_channel = self.cfg.threshold, self.cfg.per_channel

    def ternarize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(t ∈ {−1, 0, 1}, α) with α per tensor () or per channel (N, 1, ...)."""
        a = w.detach().abs()
        if self.per_channel:
            n = w.shape[0]
            shape = (n, *([1] * (w.dim() - 1)))
            delta = self.threshold * a.reshape(n, -1).mean(dim=1).reshape(shape)
            mask = a > delta
            s = (a * mask).reshape(n, -1).sum(dim=1).reshape(shape)
            c = mask.reshape(n, -1).sum(dim=1).reshape(shape)
        else:
            delta = self.threshold * a.mean()
            mask = a > delta
            s, c = (a * mask).sum(), mask.sum()
        alpha = s / c.clamp(min=1).to(s.dtype)
        t = torch.sign(w.detach()) * mask
        return t, alpha

    def quantize(self, w: Tensor) -> Tensor:
        t, alpha = self.ternarize(w)
        return ste(w, alpha * ((t + 1) - 1))

    def encode(self, w: Tensor) -> Affine:
        t, alpha = self.ternarize(w)
        n = w.shape[0]
        return Affine((t + 1).reshape(n, -1).to(torch.uint8), to_rows(alpha, w),
                      torch.ones(n), 2)


class _TTQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, wp: Tensor, wn: Tensor, delta: Tensor) -> Tensor:
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        return torch.where(pos, wp, zero) - torch.where(neg, wn, zero)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        pos, neg, wp, wn = ctx.saved_tensors
        scale = torch.where(pos, wp, torch.where(neg, wn, torch.ones_like(wp)))
        return g * scale, (g * pos).sum().reshape(wp.shape), -(g * neg).sum().reshape(wn.shape), None


@register
class TTQ(Quantizer):
    name = "ttq"
    kinds = ("weight",)
    bits = 2

    @dataclass
    class Config(Quantizer.Config):
        threshold: float = 0.05
        """Δ = threshold·max|W| (t), in (0, 1.0)."""
        init: Optional[float] = None
        """The initial W_p and W_n, > 0 (null: TWN's α of the initial weights)."""

        def __post_init__(self) -> None:
            _check_threshold(self.threshold, 1.0)
            i = self.init
            need(i is None or i > 0, "init", f"must be > 0; got {i}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.threshold, self.init = self.cfg.threshold, self.cfg.init
        self.w_p = nn.Parameter(torch.ones(()))
        self.w_n = nn.Parameter(torch.ones(()))

    def delta(self, w: Tensor) -> Tensor:
        return self.threshold * w.detach().abs().amax()

    def init_from(self, w: Tensor) -> None:
        with torch.no_grad():
            if self.init is not None:
                v = torch.tensor(float(self.init))
            else:
                a = w.detach().abs()
                mask = a > self.delta(w)
                v = (a * mask).sum() / mask.sum().clamp(min=1)
            self.w_p.fill_(float(v)), self.w_n.fill_(float(v))

    def quantize(self, w: Tensor) -> Tensor:
        return _TTQFn.apply(w, self.w_p, self.w_n, self.delta(w))

    def encode(self, w: Tensor) -> Ternary2:
        d = self.delta(w)
        n = w.shape[0]
        t = (w > d).to(torch.uint8) * 2 + ((w >= -d) & (w <= d)).to(torch.uint8)
        return Ternary2(t.reshape(n, -1), self.w_p.detach().float().expand(n).clone(),
                        self.w_n.detach().float().expand(n).clone())


@register
class AbsMean(Quantizer):
    name = "absmean"
    kinds = ("weight",)
    bits = 2
    eps = 1e-5

    def scale(self, w: Tensor) -> Tensor:
        return w.detach().abs().mean()

    def quantize(self, w: Tensor) -> Tensor:
        g = self.scale(w)
        q = torch.clamp(torch.round(w.detach() / (g + self.eps)), -1, 1)
        return ste(w, q * g)

    def encode(self, w: Tensor) -> Affine:
        g = self.scale(w)
        q = torch.clamp(torch.round(w / (g + self.eps)), -1, 1)
        n = w.shape[0]
        return Affine((q + 1).reshape(n, -1).to(torch.uint8), g.float().expand(n).clone(),
                      torch.ones(n), 2)

"""Flexpoint flex16+5 (Köster et al., NIPS 2017, "Flexpoint: An Adaptive Numerical Format for
Efficient Training of Deep Neural Networks") with Autoflex exponent management.

A tensor is M·2^κ: M int16 (two's complement, [−2^15, 2^15 − 1]) and one shared exponent κ per
tensor, κ ∈ [−32, 0] (neon flexsim clamps the scale to [2^−32, 1]). The forward pass quantizes
x̂ = clamp(round(x/2^κ), −2^15, 2^15 − 1)·2^κ (identity STE, zero beyond saturation; as a
gradient quantizer the same map is applied to the gradient of the layer output).

Autoflex (ngraph-python ``flexgpu.py`` @783a868, "copied from neon flexsim"), run by
``qat_step`` after every optimizer step with max|x| MAX-reduced over ranks:

* history: the last ``history`` (16) maxima of the tensor;
* overflow: if max|x| ≥ (2^15 − 1)·2^κ, count it, clear the history and record 2·max|x|;
* prediction: maxval = max(history) + 3·std(history) + 100·2^κ, then
  κ = ⌊log2 maxval⌋ − 14, so the predicted maximum lands in [2^14, 2^15) of the int16 range;
* initialisation (no history yet): κ from the tensor itself, ⌊log2 max|x|⌋ − 14 — the fixed
  point of the reference's saturate ×2^7 / shift-by-deficit loop.

The exponent, history, overflow count and the "initialized" flag are buffers (checkpointed);
after a commit they are identical on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Flex
from dqt.quant.ste import ste

KAPPA_MIN, KAPPA_MAX = -32, 0


def flex_exponent(maxval: Tensor, mant_bits: int = 16) -> Tensor:
    """κ placing ``maxval`` in [2^(b−2), 2^(b−1)) of the b-bit mantissa, clamped to [−32, 0]."""
    e = torch.floor(torch.log2(maxval.clamp(min=2.0 ** -126))) - (mant_bits - 2)
    return e.clamp(KAPPA_MIN, KAPPA_MAX)


def flex_quantize(x: Tensor, kappa: Tensor, mant_bits: int = 16) -> Tensor:
    top = 2 ** (mant_bits - 1)
    scale = torch.exp2(kappa)
    return torch.clamp(torch.round(x / scale), -top, top - 1) * scale


@register
class Flexpoint(Quantizer):
    name = "flex"
    kinds = ("weight", "act", "grad")
    stateful = True

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 16
        """Mantissa bits: 16 (flex16+5)."""
        exp_bits: int = 5
        """Exponent bits: 5 (flex16+5)."""
        history: int = 16
        """Autoflex: the maxima kept per tensor, 2..1024."""

        def __post_init__(self) -> None:
            need(self.bits == 16, "bits", f"flex16+5 has 16-bit mantissas; got {self.bits}")
            need(self.exp_bits == 5, "exp_bits",
                 f"flex16+5 has a 5-bit exponent; got {self.exp_bits}")
            h = self.history
            need(2 <= h <= 1024, "history", f"must be in [2, 1024]; got {h}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        bits, exp_bits, history = self.cfg.bits, self.cfg.exp_bits, self.cfg.history
        self.bits, self.exp_bits, self.history = bits, exp_bits, history
        self.register_buffer("kappa", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("maxima", torch.zeros(history))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("overflows", torch.zeros((), dtype=torch.long))
        self._pending: Optional[Tensor] = None

    def storage_bits(self) -> Optional[float]:
        return 16.0

    def current_kappa(self, x: Tensor) -> Tensor:
        own = flex_exponent(x.detach().abs().amax(), self.bits)
        return torch.where(self.initialized, self.kappa, own)

    def quantize(self, x: Tensor) -> Tensor:
        if self.training and (torch.is_grad_enabled() or self.kind == "grad"):
            m = x.detach().abs().amax().reshape(1).float()
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            self._pending = m if self._pending is None else torch.maximum(self._pending, m)
        q = flex_quantize(x.detach(), self.current_kappa(x), self.bits)
        top = (2 ** (self.bits - 1)) * torch.exp2(self.current_kappa(x))
        xc = torch.minimum(torch.maximum(x, -top), top)
        return ste(xc, q)

    def encode(self, w: Tensor) -> Flex:
        kappa = self.current_kappa(w)
        scale = torch.exp2(kappa)
        top = 2 ** (self.bits - 1)
        m = torch.clamp(torch.round(w / scale), -top, top - 1)
        return Flex(m.reshape(w.shape[0], -1).to(torch.int16), int(kappa))

    def stats(self) -> Optional[Tensor]:
        out = self._pending if self._pending is not None else torch.full((1,), -float("inf"))
        self._pending = None
        return out

    def commit(self, stats: Tensor) -> None:
        m = float(stats[0])
        if not math.isfinite(m):
            return
        if not bool(self.initialized):
            self.kappa.fill_(float(flex_exponent(torch.tensor(m), self.bits)))
            self.initialized.fill_(True)
        scale = 2.0 ** float(self.kappa)
        if m >= (2 ** (self.bits - 1) - 1) * scale:  # overflow: clear, record twice the max
            self.overflows += 1
            self.count.zero_()
            m = 2 * m
        i = int(self.count) % self.history
        self.maxima[i] = m
        self.count += 1
        hist = self.maxima[: min(int(self.count), self.history)].double()
        maxval = hist.max() + 3 * hist.std(unbiased=False) + 100 * scale
        self.kappa.fill_(float(flex_exponent(maxval, self.bits)))

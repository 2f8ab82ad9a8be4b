"""WAGE: weights, activations, gradients and errors as low-bit integers (Wu, Li, Chen & Shi,
ICLR 2018, arXiv 1802.04680, "Training and Inference with Integers in Deep Neural Networks";
reference code boluoweifenda/WAGE ``source/Quantize.py``, ``myInitializer.py``).

With σ(k) = 2^(1−k), Shift(x) = 2^round(log2 x) and

    C(x, k) = clip(x, −1 + σ(k), 1 − σ(k)),        Q(x, k) = σ(k)·round(x / σ(k)):

* ``wage_w`` (weights, k_W = ``bits``, 2 in the paper): W_q = Q(C(W, k_W), k_W) / α, identity STE
  (the clip and the rounding are skipped in the backward pass, as the reference's
  ``x + stop_gradient(y − x)``). The layer scale α = max(Shift(L_min / L), 1) with
  L_min = β·σ(k_W), β = 1.5, and L = √(3 / fan_in) (the reference's uniform variance-scaling
  init); the reference divides only when α > 1.8. ``init_from`` rescales the layer's initial
  weight so that max|W| = max(L_min, L) — WAGE's U(−L, L) init for PyTorch's default uniform
  init (without it every 2-bit weight rounds to 0) — and ``after_step`` clips W to
  [−1 + σ, 1 − σ] after every optimizer step (the reference's ``W_clip_op``).
  ``grad_bits`` k_G (8 in the paper; null = fp32 gradient) quantizes the gradient of W in the
  backward pass: g_s = η·g / Shift(max|g|) (η = ``grad_lr``, the paper's learning rate 8),
  Q_G(g) = σ(k_G)·sgn(g_s)·(⌊|g_s|⌋ + Bernoulli(|g_s| − ⌊|g_s|⌋)). WAGE then updates W ← W − Q_G(g)
  (plain SGD, lr 1); here the optimizer's own update applies to Q_G(g) (the preset says which).
  The stochastic rounding draws from each rank's own generator: the ranks' Q_G(g) differ and
  DDP averages them, so the parameters stay identical (on one rank the update is WAGE's).
* ``wage_a`` (input activations, k_A = ``bits``, 8): a_q = Q(C(a, k_A), k_A), gradient through the
  clip only (1 on [−1 + σ, 1 − σ]).
* ``wage_e`` (errors: the gradient of the layer output, identity forward; k_E = ``bits``, 8):
  e_q = Q(C(e / Shift(max|e|), k_E), k_E), max over the whole tensor. The paper (and reference)
  pass the normalized error on; ``rescale: true`` multiplies it back by Shift(max|e|) (an exact
  power-of-two shift) so layers trained with fp32 gradients (BatchNorm, biases, fp first/last
  layers) see gradients of the usual magnitude.

Export (``wage_w``): ``affine`` codes q = round(C(W)/σ) + (2^(k−1) − 1) ∈ [0, 2^k − 2] with
scale σ/α and zero 2^(k−1) − 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Affine
from dqt.quant.ste import ste

BETA = 1.5


def sigma(bits: int) -> float:
    return 2.0 ** (1 - bits)


def clip(x: Tensor, bits: int) -> Tensor:
    s = sigma(bits)
    return torch.clamp(x, -1 + s, 1 - s)


def shift(x: Tensor) -> Tensor:
    """2^round(log2 x) (x > 0)."""
    return torch.exp2(torch.round(torch.log2(x)))


def layer_scale(fan_in: int, bits: int) -> float:
    """WAGE's α = max(Shift(β·σ(k) / √(3/fan_in)), 1), applied only when α > 1.8."""
    limit = math.sqrt(3.0 / fan_in)
    a = 2.0 ** round(math.log2(BETA * sigma(bits) / limit))
    return a if a > 1.8 else 1.0


def init_limit(fan_in: int, bits: int) -> float:
    return max(BETA * sigma(bits), math.sqrt(3.0 / fan_in))


def quantize_grad(g: Tensor, bits: int, lr: float, u: Tensor) -> Tensor:
    """Q_G with the uniforms ``u`` ∈ [0, 1) given: σ(k)·sgn(g_s)·(⌊|g_s|⌋ + [u < frac|g_s|])."""
    m = g.abs().amax()
    safe = torch.where(m > 0, m, torch.ones_like(m))
    gs = lr * g / shift(safe)
    a = gs.abs()
    whole = torch.floor(a)
    out = torch.sign(gs) * (whole + (u < a - whole).to(g.dtype)) * sigma(bits)
    return torch.where(m > 0, out, torch.zeros_like(g))


def _check_bits(b: Optional[int], key: str, lo: int, hi: int) -> None:
    need(b is None or lo <= b <= hi, key, f"must be in [{lo}, {hi}]; got {b}")


class _QuantizeWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor, q: "WAGEWeight") -> Tensor:
        ctx.q = q
        return w.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        q = ctx.q
        out = quantize_grad(g.float(), q.grad_bits, q.grad_lr, torch.rand_like(g, dtype=torch.float32))
        return torch.where(torch.isfinite(g), out.to(g.dtype), g), None


@register
class WAGEWeight(Quantizer):
    name = "wage_w"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 2
        """k_W, 2..8."""
        grad_bits: Optional[int] = None
        """k_G: bits of the weight gradient Q_G, 2..16 (null: fp32 gradient)."""
        grad_lr: float = 8.0
        """η inside Q_G (the paper's learning rate 8), > 0."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, "bits", 2, 8)
            _check_bits(self.grad_bits, "grad_bits", 2, 16)
            lr = self.grad_lr
            need(lr > 0, "grad_lr", f"must be > 0; got {lr}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.grad_bits, self.grad_lr = c.bits, c.grad_bits, c.grad_lr

    def _affine(self, w: Tensor) -> tuple[Tensor, float, float]:
        """(codes, scale σ/α, zero) with W_q = scale·(codes − zero)."""
        s = sigma(self.bits)
        zero = float(2 ** (self.bits - 1) - 1)
        codes = torch.round(clip(w.detach(), self.bits) / s) + zero
        return codes, s / layer_scale(w[0].numel(), self.bits), zero

    def quantize(self, w: Tensor) -> Tensor:
        if self.grad_bits is not None and torch.is_grad_enabled() and w.requires_grad:
            w = _QuantizeWeightGrad.apply(w, self)
        codes, scale, zero = self._affine(w)
        return ste(w, scale * (codes - zero))

    def init_from(self, w: Tensor) -> None:
        if isinstance(w, nn.Parameter) and w.dim() > 1:  # the layer's own weight (not a view)
            m = w.abs().amax()
            if m > 0:
                w.mul_(init_limit(w[0].numel(), self.bits) / m)

    def after_step(self, weight: Optional[Tensor]) -> None:
        if weight is not None:
            with torch.no_grad():
                weight.copy_(clip(weight, self.bits))

    def encode(self, w: Tensor) -> Affine:
        codes, scale, zero = self._affine(w)
        n = w.shape[0]
        return Affine(codes.reshape(n, -1).to(torch.uint8), torch.full((n,), scale),
                      torch.full((n,), zero), self.bits)


@register
class WAGEAct(Quantizer):
    name = "wage_a"
    kinds = ("act",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 8
        """k_A, 2..15."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, "bits", 2, 15)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits = self.cfg.bits

    def quantize(self, x: Tensor) -> Tensor:
        xc = clip(x, self.bits)
        s = sigma(self.bits)
        return ste(xc, torch.round(xc.detach() / s) * s)


@register
class WAGEError(Quantizer):
    name = "wage_e"
    kinds = ("grad",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 8
        """k_E, 2..15."""
        rescale: bool = False
        """Multiply the quantized error back by Shift(max|e|) (usual gradient magnitudes)."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, "bits", 2, 15)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.rescale = self.cfg.bits, self.cfg.rescale

    def quantize(self, e: Tensor) -> Tensor:
        m = e.abs().amax()
        sh = shift(torch.where(m > 0, m, torch.ones_like(m)))
        s = sigma(self.bits)
        q = torch.round(clip(e / sh, self.bits) / s) * s
        if self.rescale:
            q = q * sh
        return torch.where(m > 0, q, torch.zeros_like(e))

    def storage_bits(self) -> Optional[float]:
        return None

"""Expectation Backpropagation (Soudry, Hubara & Meir, "Expectation Backpropagation:
parameter-free training of multilayer neural networks with continuous or discrete weights",
NeurIPS 2014; the survey's EBP), binary-weight case.

* ``ebp`` — each weight w_ij ∈ {−1, +1} has a mean-field (factorized) posterior
  P(w_ij) ∝ exp(h_ij·w_ij): P(w_ij = +1) = (1 + tanh h_ij)/2, mean ⟨w_ij⟩ = tanh(h_ij),
  variance 1 − tanh²(h_ij). The posterior's natural parameter is h = W/s: W the layer's own
  weight, s = mean|W₀|/``gain`` from the layer's initial weight (a buffer, fixed once
  attached). s maps dqt's initialization (|W₀| ~ 1/√fan_in) to |h| ~ ``gain``: how certain
  the posterior starts (``gain: 1``: tanh(1) ≈ 0.76 for a weight of average size; the preset's
  3: 0.995).

  Forward (training): the mean network, W̄ = tanh(h). By the central limit theorem the
  pre-activation u_i = Σ_j w_ij·x_j of a fixed input x is Gaussian with
  μ_i = Σ_j tanh(h_ij)·x_j and σ²_i = Σ_j (1 − tanh²(h_ij))·x_j² (the paper's eq. for the
  first layer's mean and variance; :func:`moments` computes both for a Linear or Conv layer).

  Update: the paper updates the natural parameter by the derivative of the log-likelihood with
  respect to the *mean* weight, Δh_ij ∝ ∂ ln P(y | x)/∂⟨w_ij⟩ (no derivative of tanh:
  the message is in h's coordinates). Here the backward pass gives the layer's weight that
  gradient, ∂L/∂W_ij := ∂L/∂⟨w_ij⟩, and the trainer's optimizer applies it (h moves by
  −lr·∂L/∂⟨w⟩/s).

  Deployment (evaluation, export): the MAP binary weights, w = sign(h) ∈ {−1, +1} (sign(0) =
  +1), exported as 1-bit codes like ``bnn_sign``. As in BNN the weights have no scale, so a
  BatchNorm should follow the layer.

Departures from the paper: the likelihood is the task's loss (cross entropy) of the mean
network, not the paper's probit likelihood of the CLT Gaussian output, and the variances σ²
propagate through no layer in training (dqt's models have ReLU and BatchNorm, not the paper's
sign neurons, for which the next layer's input mean would be 2Φ(μ/σ) − 1); the step size is the
trainer's learning rate, not the paper's parameter-free unit step, and the initial certainty
``gain`` is dqt's (a knob the paper does not have). Only binary weights (the paper also treats
ternary and continuous ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Affine
from dqt.quant.ste import sign, ste


def moments(x: Tensor, h: Tensor, layer: Optional[nn.Module] = None) -> tuple[Tensor, Tensor]:
    """(μ, σ²) of the pre-activation u = W·x (bias excluded) when every w_ij is ±1 with mean
    tanh(h_ij), independently: μ = x·tanh(h)ᵀ, σ² = x²·(1 − tanh² h)ᵀ; for a Conv ``layer``
    the same sums over each window (its stride, padding, dilation and groups)."""
    m = torch.tanh(h)
    if isinstance(layer, nn.modules.conv._ConvNd):
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[h.dim() - 2]
        if layer.padding_mode != "zeros":
            raise ValueError("moments: only zero padding")
        kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                  groups=layer.groups)
        return conv(x, m, None, **kw), conv(x * x, 1 - m * m, None, **kw)
    return F.linear(x, m), F.linear(x * x, 1 - m * m)


@register
class EBP(Quantizer):
    name = "ebp"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        gain: float = 1.0
        """g > 0 in h = g·W / mean|W₀|: how certain the posterior starts."""

        def __post_init__(self) -> None:
            need(self.gain > 0, "gain", f"must be > 0; got {self.gain}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.gain = self.cfg.gain
        self.register_buffer("s", torch.ones(()))

    def init_from(self, w: Tensor) -> None:
        self.s.fill_(float(w.detach().float().abs().mean().clamp(min=1e-12)) / self.gain)

    def quantize(self, w: Tensor) -> Tensor:
        if self.training:  # ⟨w⟩ = tanh(h), h = W/s; ∂L/∂W := ∂L/∂⟨w⟩
            return ste(w, torch.tanh(w.detach() / self.s))
        return ste(w, sign(w.detach()))  # sign(h) = sign(W): s > 0

    def moments(self, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """The CLT mean and variance of this layer's pre-activations for input ``x`` (``w``: the
        layer's weight, h = w/s)."""
        return moments(x, w.detach().float() / self.s, self.layer)

    def storage_bits(self) -> Optional[float]:
        return 1.0

    def encode(self, h: Tensor) -> Affine:
        n = h.shape[0]
        codes = (sign(h.detach().float()) > 0).reshape(n, -1).to(torch.uint8)
        return Affine(codes, torch.full((n,), 2.0), torch.full((n,), 0.5), 1)

    def assumes_batch_norm(self) -> Optional[str]:
        return "weights are ±1 without a scale"

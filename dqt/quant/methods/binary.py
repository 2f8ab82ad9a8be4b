"""Binary quantizers.

* ``bnn_sign`` — BNN (Hubara, Courbariaux et al. 2016): x_b = sign(x) (sign(0) = +1), or
  stochastically +1 with probability σ_hard(x) = clip((x + 1)/2, 0, 1) (training only); hardtanh
  STE g_r = g_q·1{|x| ≤ 1}; as a weight quantizer the real weights are clipped to [−1, 1] after
  every optimizer step.
* ``binary_connect`` — BinaryConnect (Courbariaux, Bengio & David 2015): weights only, the same
  deterministic / stochastic binarization, identity STE, weights clipped to [−1, 1].
* ``bwn`` — Binary-Weight-Networks (Rastegari et al. 2016): W ≈ α·sign(W), α = mean|W| per
  output channel (‖W‖₁/n), with the paper's gradient ∂C/∂W = ∂C/∂W̃·(1/n + α·1{|W| ≤ 1}).
* ``xnor`` — XNOR-Net input binarization (same paper): the input goes to sign(I) (hardtanh STE)
  and the layer output is multiplied by K: for a Linear, K = mean|I| over the input features
  (per row); for a Conv, K = A ⊛ k with A = mean_c|I| and k the 1/(kh·kw) box filter of the
  layer's kernel, stride, padding and dilation. K is a constant in the backward pass. With
  ``bwn`` weights this is the full XNOR-Net layer: (sign(I) ⊛ sign(W)) ⊙ K·α.
* ``horq`` — High-Order Residual Quantization of inputs (Li et al. 2017, arXiv 1708.08687):
  R₁ = x, βᵢ = mean|Rᵢ|, Hᵢ = sign(Rᵢ), Rᵢ₊₁ = Rᵢ − βᵢHᵢ, x̂ = Σᵢ βᵢHᵢ (order 2 by default), the
  means over the feature axis (Linear: last dim; Conv: channels, per position); identity STE.

Binary weights export as 1-bit ``affine`` codes [w ≥ 0] with zero ½ and scale 2α (α = 1 for
``bnn_sign`` / ``binary_connect``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Affine
from dqt.quant.ste import sign, sign_ste_htanh, ste


def hard_sigmoid(x: Tensor) -> Tensor:
    return torch.clamp((x + 1) / 2, 0.0, 1.0)


class _SignBase(Quantizer):
    """±1 binarization; ``stochastic`` samples +1 with probability hard_sigmoid(x) in training."""

    bits = 1

    @dataclass
    class Config(Quantizer.Config):
        stochastic: bool = False
        """Training: +1 with probability hard_sigmoid(x) instead of sign(x)."""

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.stochastic = self.cfg.stochastic

    def signs(self, x: Tensor) -> Tensor:
        if self.stochastic and self.training:
            return torch.where(torch.rand_like(x) < hard_sigmoid(x), 1.0, -1.0).to(x.dtype)
        return sign(x)

    def encode(self, w: Tensor) -> Affine:
        n = w.shape[0]
        codes = (self.signs(w) > 0).reshape(n, -1).to(torch.uint8)
        return Affine(codes, torch.full((n,), 2.0), torch.full((n,), 0.5), 1)

    def assumes_batch_norm(self) -> Optional[str]:
        return "weights are ±1 without a scale" if self.kind == "weight" else None

    def after_step(self, weight: Optional[Tensor]) -> None:
        if weight is not None and self.kind == "weight":
            with torch.no_grad():
                weight.clamp_(-1.0, 1.0)


@register
class BNNSign(_SignBase):
    name = "bnn_sign"

    def quantize(self, x: Tensor) -> Tensor:
        ht = x.clamp(-1.0, 1.0)
        return self.signs(x.detach()) - (ht.detach() - ht)


@register
class BinaryConnect(_SignBase):
    name = "binary_connect"
    kinds = ("weight",)

    def quantize(self, x: Tensor) -> Tensor:
        return ste(x, self.signs(x.detach()))


class _BWNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: Tensor) -> Tensor:
        n = w.shape[0]
        alpha = w.reshape(n, -1).abs().mean(dim=1).reshape(n, *([1] * (w.dim() - 1)))
        ctx.save_for_backward(w, alpha)
        ctx.n = w[0].numel()
        return (2 * alpha) * ((w >= 0).to(w.dtype) - 0.5)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        w, alpha = ctx.saved_tensors
        return g * (1.0 / ctx.n + alpha * (w.abs() <= 1).to(g.dtype))


@register
class BWN(Quantizer):
    name = "bwn"
    kinds = ("weight",)
    bits = 1

    def quantize(self, w: Tensor) -> Tensor:
        return _BWNFn.apply(w)

    def encode(self, w: Tensor) -> Affine:
        n = w.shape[0]
        w2 = w.reshape(n, -1)
        alpha = w2.abs().mean(dim=1)
        return Affine((w2 >= 0).to(torch.uint8), 2 * alpha, torch.full((n,), 0.5), 1)


def _feature_dim(layer: Optional[nn.Module]) -> int:
    return 1 if isinstance(layer, nn.modules.conv._ConvNd) else -1


@register
class XNORInput(Quantizer):
    name = "xnor"
    kinds = ("act",)
    bits = 1

    def __init__(self, kind: str, cfg: Optional[Quantizer.Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self._k: Optional[Tensor] = None

    def scaling(self, x: Tensor) -> Tensor:
        """K (detached), broadcastable to the layer output."""
        layer = self.layer
        a = x.detach().abs()
        if isinstance(layer, nn.modules.conv._ConvNd):
            a = a.mean(dim=1, keepdim=True)
            nd = a.dim() - 2
            box = torch.full((1, 1, *layer.kernel_size), 1.0 / float(torch.tensor(
                layer.kernel_size).prod()), dtype=a.dtype, device=a.device)
            conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
            return conv(a, box, stride=layer.stride, padding=layer.padding,
                        dilation=layer.dilation)
        return a.mean(dim=-1, keepdim=True)

    def quantize(self, x: Tensor) -> Tensor:
        self._k = self.scaling(x)
        return sign_ste_htanh(x)

    def output_scale(self) -> Optional[Tensor]:
        k, self._k = self._k, None
        return k


@register
class HORQ(Quantizer):
    name = "horq"
    kinds = ("act",)

    @dataclass
    class Config(Quantizer.Config):
        order: int = 2
        """Residual order: the number of binary terms βᵢHᵢ, 1..4."""

        def __post_init__(self) -> None:
            need(1 <= self.order <= 4, "order", f"must be in [1, 4]; got {self.order}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.order = self.cfg.order

    @property
    def bits(self) -> int:
        return self.order

    def quantize(self, x: Tensor) -> Tensor:
        dim = _feature_dim(self.layer)
        r = x.detach()
        out = torch.zeros_like(r)
        for _ in range(self.order):
            beta = r.abs().mean(dim=dim, keepdim=True)
            h = beta * sign(r)
            out = out + h
            r = r - h
        return ste(x, out)

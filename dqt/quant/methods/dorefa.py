"""DoReFa-Net (Zhou et al. 2016, arXiv 1606.06160; tensorpack ``examples/DoReFa-Net/dorefa.py``).

* ``quantize_k(r) = round((2^k − 1)·r) / (2^k − 1)`` with an identity STE.
* ``dorefa_w`` (weights): k > 1: w_q = 2·quantize_k(tanh(w) / (2·max|tanh(w)|) + ½) − 1, the max
  over the whole tensor *not* stop-gradiented (tensorpack); k = 1: w_q = E(|w|)·sign(w), E the
  layer mean with stop-gradient, sign(0) = +1, identity STE.
  DoReFa's [−1, 1]-range weights assume a BatchNorm after the layer (the paper's and
  tensorpack's nets have one after every quantized conv; ``model.batch_norm=true`` here, and
  ``prepare`` warns when a layer has none). ``rescale: true`` is for models without it: it
  multiplies the k > 1 weights by E(|w|) (stop-gradient) as the k = 1 case does; without either
  the activations blow up and training collapses (measured: chance accuracy on the BN-less
  digits CNN). The affine export then has scale 2·E/(2^k − 1).
* ``dorefa_a`` (input activations): a_q = quantize_k(clip(a, 0, 1)) — DoReFa's ``nonlin`` clip
  fused in, since the layer input here is the output of the model's own ReLU; gradient 1{0≤a≤1}.
* ``dorefa_g`` (gradient of the layer output, identity forward): per sample, M = max|g| over
  every axis but the batch axis,
  g̃ = 2M·[quantize_k(clip(g/(2M) + ½ + U(−½/(2^k−1), ½/(2^k−1)), 0, 1)) − ½].

Weights are exported as ``affine`` codes q with scale 2/(2^k − 1) and zero (2^k − 1)/2 (1-bit:
scale 2E, zero ½); the forward value is computed as scale·(q − zero) so decode is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Affine
from dqt.quant.ste import round_ste, sign, ste


def quantize_k(r: Tensor, bits: int) -> Tensor:
    n = float(2 ** bits - 1)
    return round_ste(r * n) / n


def dorefa_grad(g: Tensor, bits: int, u: Tensor) -> Tensor:
    """DoReFa ``fg`` with the uniforms ``u`` ∈ [0, 1) given (the noise is (u − ½)/(2^k − 1))."""
    n = float(2 ** bits - 1)
    dims = tuple(range(1, g.dim()))
    m = g.abs().amax(dim=dims, keepdim=True) if dims else g.abs()
    safe = torch.where(m > 0, m, torch.ones_like(m))
    x = g / safe * 0.5 + 0.5 + (u - 0.5) / n
    x = torch.clamp(x, 0.0, 1.0)
    x = torch.round(x * n) / n - 0.5
    return torch.where(m > 0, x * safe * 2, torch.zeros_like(g))


def _check_bits(bits: int, lo: int, hi: int) -> None:
    need(lo <= bits <= hi, "bits", f"must be in [{lo}, {hi}]; got {bits}")


@register
class DoReFaWeight(Quantizer):
    name = "dorefa_w"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 2
        """Bit-width k, 1..8."""
        rescale: bool = False
        """k > 1: scale the weights by mean|W| (for models without BatchNorm)."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 1, 8)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.rescale = self.cfg.bits, self.cfg.rescale

    def _affine(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(codes with STE, scale, zero) such that w_q = scale·(codes − zero)."""
        if self.bits == 1:
            e = w.detach().abs().mean()
            return ste(w, (w >= 0).to(w.dtype)), 2 * e, torch.tensor(0.5)
        n = float(2 ** self.bits - 1)
        t = torch.tanh(w)
        r = t / (2 * t.abs().amax()) + 0.5
        s = torch.tensor(2.0 / n)
        if self.rescale:  # w_q·E(|w|), E stop-gradient (as DoReFa's own k = 1 case)
            s = s * w.detach().abs().mean()
        return round_ste(r * n), s, torch.tensor(n / 2)

    def assumes_batch_norm(self) -> Optional[str]:
        if self.bits == 1 or self.rescale:
            return None
        return "weights span [-1, 1] whatever the fan-in; rescale: true is the BN-free variant"

    def quantize(self, w: Tensor) -> Tensor:
        q, s, z = self._affine(w)
        if self.bits == 1:  # identity STE on w itself
            return ste(w, s * (q.detach() - z))
        return s * (q - z)

    def encode(self, w: Tensor) -> Affine:
        q, s, z = self._affine(w)
        n = w.shape[0]
        return Affine(q.detach().reshape(n, -1).to(torch.uint8), s.float().expand(n).clone(),
                      z.float().expand(n).clone(), self.bits)


@register
class DoReFaAct(Quantizer):
    name = "dorefa_a"
    kinds = ("act",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 2
        """Bit-width k, 1..8."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 1, 8)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits = self.cfg.bits

    def quantize(self, x: Tensor) -> Tensor:
        return quantize_k(torch.clamp(x, 0.0, 1.0), self.bits)

    def unsigned_range(self) -> Optional[str]:
        return "[0, 1]"


@register
class DoReFaGrad(Quantizer):
    name = "dorefa_g"
    kinds = ("grad",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 8
        """Bit-width k of the gradient, 1..16."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 1, 16)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits = self.cfg.bits

    def quantize(self, g: Tensor) -> Tensor:
        return dorefa_grad(g, self.bits, torch.rand_like(g))

    def storage_bits(self) -> Optional[float]:
        return None

"""The seed's tanh quantizer (pytorch-playground ``utee/quant.py``): squash with tanh, quantize
uniformly in [−1, 1] with 2^bits − 1 steps, map back with atanh::

    v = floor((tanh(x) + 1)/2 · n + ½) / n,  n = 2^bits − 1;   x̂ = atanh(2v − 1)

``tanh_quantize`` is the seed's code verbatim: its two outermost levels (2v − 1 = ±1) decode to
±∞. The registered ``tanh`` quantizer is the same map with those two levels decoded at the
boundary where rounding enters them, ±atanh(1 − 1/n), so training stays finite. STE: identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Tanh as TanhCodes, tanh_decode
from dqt.quant.ste import ste


def tanh_quantize(input: Tensor, bits: int) -> Tensor:
    """The seed's tanh quantizer, verbatim (no STE; outermost levels → ±inf)."""
    assert bits >= 1, bits
    if bits == 1:
        return torch.sign(input)
    input = torch.tanh(input)
    input_rescale = (input + 1.0) / 2
    n = math.pow(2.0, bits) - 1
    v = torch.floor(input_rescale * n + 0.5) / n
    v = 2 * v - 1
    v = 0.5 * torch.log((1 + v) / (1 - v))
    return v


def tanh_codes(x: Tensor, bits: int) -> Tensor:
    n = 2.0 ** bits - 1
    return torch.floor((torch.tanh(x) + 1.0) / 2 * n + 0.5)


@register
class TanhQuant(Quantizer):
    name = "tanh"

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 4
        """Bit-width: 2^bits − 1 steps in [−1, 1], 2..8."""

        def __post_init__(self) -> None:
            need(2 <= self.bits <= 8, "bits", f"must be in [2, 8]; got {self.bits}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits = self.cfg.bits

    def quantize(self, x: Tensor) -> Tensor:
        return ste(x, tanh_decode(tanh_codes(x, self.bits), self.bits))

    def encode(self, w: Tensor) -> TanhCodes:
        return TanhCodes(tanh_codes(w, self.bits).reshape(w.shape[0], -1).to(torch.uint8),
                         self.bits)

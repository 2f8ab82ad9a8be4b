"""Minifloat (Ristretto, Gysel et al. 2016, §"Minifloat"): a float with ``exp_bits`` exponent
and ``mant_bits`` mantissa bits, IEEE-754 style — bias 2^(e−1) − 1, subnormals, round to
nearest even — saturating at the largest finite value (2 − 2^−m)·2^(2^e − 2 − bias) instead of
overflowing (no inf/NaN codes). e5m10 is IEEE half precision (tested against numpy float16).

x̂ = sign(x) · round(|x| / ulp) · ulp,  ulp = 2^(max(⌊log2|x|⌋, 1 − bias) − m),  |x̂| ≤ max.
STE: identity, zero beyond ±max (saturation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.ste import _through
from dqt.quant.export.codes import Minifloat as MinifloatCodes


def minifloat_params(exp_bits: int, mant_bits: int) -> tuple[int, int, float]:
    bias = 2 ** (exp_bits - 1) - 1
    emin, emax = 1 - bias, 2 ** exp_bits - 2 - bias
    return emin, emax, (2 - 2.0 ** -mant_bits) * 2.0 ** emax


def minifloat_round(x: Tensor, exp_bits: int, mant_bits: int) -> Tensor:
    emin, _, top = minifloat_params(exp_bits, mant_bits)
    a = x.abs()
    _, e = torch.frexp(a)  # a = f·2^e, f ∈ [0.5, 1)  →  ⌊log2 a⌋ = e − 1
    ex = torch.clamp(e - 1, min=emin) - mant_bits
    q = torch.ldexp(torch.round(torch.ldexp(a, -ex)), ex)
    return torch.copysign(torch.clamp(q, max=top), x)


@register
class Minifloat(Quantizer):
    name = "minifloat"

    @dataclass
    class Config(Quantizer.Config):
        exp_bits: int = 4
        """Exponent bits, 2..8."""
        mant_bits: int = 3
        """Mantissa bits, 0..23."""

        def __post_init__(self) -> None:
            e, m = self.exp_bits, self.mant_bits
            need(2 <= e <= 8, "exp_bits", f"must be in [2, 8]; got {e}")
            need(0 <= m <= 23, "mant_bits", f"must be in [0, 23]; got {m}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.exp_bits, self.mant_bits = self.cfg.exp_bits, self.cfg.mant_bits
        self.top = minifloat_params(self.exp_bits, self.mant_bits)[2]

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.mant_bits

    def quantize(self, x: Tensor) -> Tensor:
        q = minifloat_round(x, self.exp_bits, self.mant_bits)
        xc = x.clamp(-self.top, self.top)
        return _through(q, xc)  # forward q bit for bit (−0 too)

    def encode(self, w: Tensor) -> MinifloatCodes:
        e_bits, m_bits = self.exp_bits, self.mant_bits
        emin, _, _ = minifloat_params(e_bits, m_bits)
        bias = 2 ** (e_bits - 1) - 1
        q = minifloat_round(w, e_bits, m_bits).reshape(w.shape[0], -1)
        a = q.abs()
        _, e = torch.frexp(a)
        normal = a >= 2.0 ** emin
        field = torch.where(normal, e - 1 + bias, torch.zeros_like(e)).to(torch.int64)
        unit = torch.where(normal, e - 1, torch.full_like(e, emin)) - m_bits
        mant = torch.ldexp(a, -unit).to(torch.int64) - torch.where(normal, 1 << m_bits, 0)
        sgn = torch.signbit(q).to(torch.int64)
        codes = (sgn << (e_bits + m_bits)) | (field << m_bits) | mant
        dtype = torch.int16 if self.bits <= 15 else torch.int32
        return MinifloatCodes(codes.to(dtype), e_bits, m_bits)

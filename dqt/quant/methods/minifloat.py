"""Minifloat (Ristretto, Gysel et al. 2016, §"Minifloat"): a float with ``exp_bits`` exponent
and ``mant_bits`` mantissa bits, IEEE-754 style — bias 2^(e−1) − 1, subnormals, round to
nearest even — saturating at the largest finite value (2 − 2^−m)·2^(2^e − 2 − bias) instead of
overflowing (no inf/NaN codes). e5m10 is IEEE half precision (tested against numpy float16).

x̂ = sign(x) · round(|x| / ulp) · ulp,  ulp = 2^(max(⌊log2|x|⌋, 1 − bias) − m),  |x̂| ≤ max.
STE: identity, zero beyond ±max (saturation).

``format``: ``ieee`` (above; e4m3 tops out at 240) or ``ocp``, the OCP 8-bit floating point
formats that hardware and PyTorch use: e4m3 as ``torch.float8_e4m3fn`` — no infinities, the
all-ones exponent holds normal numbers and only S.1111.111 is NaN, so the largest value is
448 — and e5m2 as ``torch.float8_e5m2`` (IEEE-style, largest 57344). Both saturate here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.ste import _through
from dqt.quant.export.codes import Minifloat as MinifloatCodes


FORMATS = ("ieee", "ocp")


def minifloat_params(exp_bits: int, mant_bits: int, fmt: str = "ieee"
                     ) -> tuple[int, int, float]:
    """(smallest normal exponent, largest exponent, largest finite value)."""
    bias = 2 ** (exp_bits - 1) - 1
    if fmt == "ocp" and exp_bits == 4:  # e4m3fn: all-ones exponent normal, S.1111.111 NaN
        emax = 2 ** exp_bits - 1 - bias
        return 1 - bias, emax, (2 - 2.0 ** (1 - mant_bits)) * 2.0 ** emax
    emin, emax = 1 - bias, 2 ** exp_bits - 2 - bias
    return emin, emax, (2 - 2.0 ** -mant_bits) * 2.0 ** emax


def minifloat_round(x: Tensor, exp_bits: int, mant_bits: int, fmt: str = "ieee") -> Tensor:
    emin, _, top = minifloat_params(exp_bits, mant_bits, fmt)
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
        format: str = "ieee"
        """``ieee`` (all-ones exponent reserved: e4m3 max 240) or ``ocp`` (OCP FP8, e4m3 or
        e5m2 only: ``torch.float8_e4m3fn``, max 448, and ``torch.float8_e5m2``, max 57344)."""

        def __post_init__(self) -> None:
            e, m = self.exp_bits, self.mant_bits
            need(2 <= e <= 8, "exp_bits", f"must be in [2, 8]; got {e}")
            need(0 <= m <= 23, "mant_bits", f"must be in [0, 23]; got {m}")
            need(self.format in FORMATS, "format",
                 f"must be one of {', '.join(FORMATS)}; got {self.format!r}")
            need(self.format != "ocp" or (e, m) in ((4, 3), (5, 2)), "format",
                 f"ocp is e4m3 or e5m2 (OCP FP8); got e{e}m{m}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.exp_bits, self.mant_bits = self.cfg.exp_bits, self.cfg.mant_bits
        self.format = self.cfg.format
        self.top = minifloat_params(self.exp_bits, self.mant_bits, self.format)[2]

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.mant_bits

    def quantize(self, x: Tensor) -> Tensor:
        q = minifloat_round(x, self.exp_bits, self.mant_bits, self.format)
        xc = x.clamp(-self.top, self.top)
        return _through(q, xc)  # forward q bit for bit (−0 too)

    def encode(self, w: Tensor) -> MinifloatCodes:
        e_bits, m_bits = self.exp_bits, self.mant_bits
        emin, _, _ = minifloat_params(e_bits, m_bits, self.format)
        bias = 2 ** (e_bits - 1) - 1
        q = minifloat_round(w, e_bits, m_bits, self.format).reshape(w.shape[0], -1)
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

"""Logarithmic and power-of-two quantizers.

* ``log_linear_quantize(x, sf, bits)`` — the seed's code verbatim: x̂ = sign(x) ·
  exp(linear_quantize(ln(|x| + 1e−20), sf, bits)), i.e. ln|x| on a fixed-point grid of step
  2^−sf (its 1-bit branch returns ``sign(x)``; the seed's ``(sign, 0.0, 0.0)`` tuple there is a
  slip of that code). Registered as ``log_linear``.
* ``ap2`` — QNN LogQuant (Hubara et al., JMLR 2018): Clip(AP2(x), −maxV, maxV) with
  AP2(x) = sign(x)·2^round(log2|x|); ``max_val`` must be a power of two.
* ``log2`` — Miyashita, Lee & Murmann 2016 ("Convolutional Neural Networks using Logarithmic
  Data Representation"): LogQuant(x, b, FSR) = 0 if x = 0, else sign(x)·2^Clip(round(log2|x|),
  FSR − 2^b, FSR).
* ``pow2`` — power-of-two weights of INQ (Zhou et al. 2017, arXiv 1702.03044, eq. 2–4):
  n1 = ⌊log2(4·max|W|/3)⌋, n2 = n1 + 1 − 2^(b−1)/2, levels {0, ±2^n2, …, ±2^n1}; a weight
  goes to β·sign(W) when (α + β)/2 ≤ |W| < 3β/2 for adjacent levels α < β, else to 0.
  All weights are quantized from the first step, trained through the STE; INQ's incremental
  partition-and-retrain schedule is the ``inq`` quantizer (``dqt.quant.methods.inq``), which reuses
  this rounding (:func:`pow2_codes`).

STE: identity for all of them. Export format ``log`` (one int8 code per weight: sign and
exponent), see ``dqt.quant.export.codes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Log, log_value
from dqt.quant.methods.fixed_point import linear_quantize
from dqt.quant.ste import ste


def log_linear_quantize(input: Tensor, sf: int, bits: int) -> Tensor:
    """The seed's log-linear quantizer, verbatim (no STE)."""
    assert bits >= 1, bits
    if bits == 1:
        return torch.sign(input)
    s = torch.sign(input)
    input0 = torch.log(torch.abs(input) + 1e-20)
    v = linear_quantize(input0, sf, bits)
    v = torch.exp(v) * s
    return v


class _LogBase(Quantizer):
    """Subclasses give (sign, exponent) as float tensors; value = sign·base^(exponent·step)."""

    base: float = 2.0

    def step_size(self) -> float:
        return 1.0

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        s, e = self.codes(x.detach())
        return ste(x, log_value(s, e, self.base, self.step_size()))

    def encode(self, w: Tensor) -> Log:
        s, e = self.codes(w)
        n = w.shape[0]
        e_min = int(e.min()) if e.numel() else 0
        code = s * (e - e_min + 1)
        dtype = torch.int8 if int(code.abs().max()) < 128 else torch.int16
        return Log(code.reshape(n, -1).to(dtype), e_min, self.base, self.step_size())

    def storage_bits(self) -> Optional[float]:
        return 8.0


def _check_bits(bits: int, lo: int, hi: int) -> None:
    need(lo <= bits <= hi, "bits", f"must be in [{lo}, {hi}]; got {bits}")


@register
class LogLinear(_LogBase):
    name = "log_linear"
    base = math.e

    @dataclass
    class Config(Quantizer.Config):
        frac_bits: int = 2
        """Fractional bits of ln|x| (the seed's ``sf``: step 2^-frac_bits), 0..16."""
        bits: int = 5
        """Bit-width of the exponent code, 2..8."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 2, 8)
            f = self.frac_bits
            need(0 <= f <= 16, "frac_bits", f"must be in [0, 16]; got {f}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.frac_bits, self.bits = self.cfg.frac_bits, self.cfg.bits

    def step_size(self) -> float:
        return 2.0 ** -self.frac_bits

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        delta, bound = 2.0 ** -self.frac_bits, 2.0 ** (self.bits - 1)
        k = torch.clamp(torch.floor(torch.log(torch.abs(x) + 1e-20) / delta + 0.5), -bound, bound - 1)
        return torch.sign(x), k


@register
class AP2(_LogBase):
    name = "ap2"

    @dataclass
    class Config(Quantizer.Config):
        max_val: float = 1.0
        """The clip maxV, a power of two."""

        def __post_init__(self) -> None:
            m = self.max_val
            need(m > 0 and math.log2(m) == round(math.log2(m)), "max_val",
                 f"must be a power of two (the clip of LogQuant lands on a level); got {m}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.max_val = self.cfg.max_val

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        top = math.log2(self.max_val)
        e = torch.clamp(torch.round(torch.log2(x.abs().clamp(min=2.0 ** -126))), max=top)
        return torch.sign(x), e


@register
class Log2(_LogBase):
    name = "log2"

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 3
        """Bit-width b: 2^b exponents below the full-scale range, 1..6."""
        fsr: int = 0
        """Full-scale range: the exponent of the largest level, -64..64."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 1, 6)
            f = self.fsr
            need(-64 <= f <= 64, "fsr", f"must be in [-64, 64]; got {f}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.fsr = self.cfg.bits, self.cfg.fsr

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e = torch.round(torch.log2(x.abs().clamp(min=2.0 ** -126)))
        e = torch.clamp(e, self.fsr - 2 ** self.bits, self.fsr)
        return torch.sign(x), e


@register
class Pow2(_LogBase):
    name = "pow2"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 5
        """Bit-width b (2^(b−1)/2 exponents and zero), 2..8."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 2, 8)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits = self.cfg.bits

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return pow2_codes(x, self.bits)


def pow2_n1(amax: Tensor) -> Tensor:
    """INQ's largest exponent n1 = ⌊log2(4·max|W|/3)⌋."""
    return torch.floor(torch.log2(amax.clamp(min=2.0 ** -100) * 4 / 3))


def pow2_codes(x: Tensor, bits: int, n1: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(sign, exponent) of INQ's rounding onto {0, ±2^n2, …, ±2^n1} (n1 from max|x| unless
    given — the ``inq`` quantizer fixes it at its first stage)."""
    a = x.abs()
    if n1 is None:
        n1 = pow2_n1(a.amax())
    n2 = n1 + 1 - 2 ** (bits - 1) / 2
    k = torch.floor(torch.log2(a.clamp(min=2.0 ** -126) * 4 / 3))
    k = torch.clamp(k, max=n1)
    below = k < n2
    keep = ~below | (a >= torch.exp2(n2 - 1))  # [2^(n2−1), 3/4·2^n2) rounds up to 2^n2
    e = torch.where(below, n2.expand_as(k), k)
    s = torch.where(keep & (a > 0), torch.sign(x), torch.zeros_like(x))
    return s, e

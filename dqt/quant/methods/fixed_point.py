"""Fixed-point quantizers: the seed's ``linear_quantize``, Ristretto's dynamic fixed point and
QNN's ``LinearQuant``.

* ``linear_quantize(x, sf, bits)`` — the seed document's code (from pytorch-playground
  ``utee/quant.py``) verbatim: δ = 2^−sf, q = clamp(floor(x/δ + ½), −2^(bits−1), 2^(bits−1) − 1),
  x̂ = q·δ. Its 1-bit branch returns ``sign(x) − 1`` ∈ {−2, −1, 0} (kept as written; the
  registered quantizer refuses bits = 1 — use ``bnn_sign``).
* ``dynamic_fixed`` — Ristretto (Gysel et al. 2016, arXiv 1605.06402) dynamic fixed point: the
  integer length il = ⌈log2 max|x|⌉ + 1 (sign bit included) is chosen per tensor from its range,
  the fractional length fl = bits − il, then ``linear_quantize(x, fl, bits)``; 1..16 bits (1 bit:
  the codes {−1, 0}, as Ristretto's ``Trim2FixedPoint``). max|x| is the tensor's own at every
  call, or, for activations with ``momentum`` set, a range kept in buffers: an EMA of the batch
  max|x| recorded in training (``dqt.quant.observers.EMARange``) — Ristretto's fixed per-layer
  integer length, calibrated on data (``launch/search_bits.py`` commits the max over calibration
  batches). Export: ≤ 8 bits ``affine`` codes, 9..16 bits int16 mantissas + one exponent (``flex``).
* ``qnn_linear`` — QNN (Hubara et al., JMLR 2018) LinearQuant(x, s) = Clip(round(x/s)·s, minV,
  maxV); minV and maxV must be multiples of s (so the result is an integer code times s).

STE: identity inside the representable range, zero where the clamp saturates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register, to_rows
from dqt.quant.export.codes import Affine, Flex
from dqt.quant.observers import EMARange
from dqt.quant.ste import floor_ste, round_ste


def linear_quantize(input: Tensor, sf: int, bits: int) -> Tensor:
    """The seed's linear quantizer, verbatim (no STE)."""
    assert bits >= 1, bits
    if bits == 1:
        return torch.sign(input) - 1
    delta = math.pow(2.0, -sf)
    bound = math.pow(2.0, bits - 1)
    min_val = -bound
    max_val = bound - 1
    rounded = torch.floor(input / delta + 0.5)
    clipped_value = torch.clamp(rounded, min_val, max_val) * delta
    return clipped_value


def _linear_codes(x: Tensor, delta: Tensor | float, bits: int, ste: bool) -> Tensor:
    bound = 2.0 ** (bits - 1)
    r = x / delta + 0.5
    return torch.clamp(floor_ste(r) if ste else torch.floor(r), -bound, bound - 1)


def _affine_rows(q: Tensor, delta: Tensor | float, bits: int, w: Tensor) -> Affine:
    zero = 2.0 ** (bits - 1)
    d = torch.as_tensor(delta, dtype=torch.float32)
    return Affine((q + zero).reshape(w.shape[0], -1).to(torch.uint8), to_rows(d, w),
                  torch.full((w.shape[0],), zero), bits)


def _check_bits(bits: int, lo: int, hi: int) -> None:
    need(lo <= bits <= hi, "bits", f"must be in [{lo}, {hi}]; got {bits}")


@register
class Linear(Quantizer):
    """The seed's ``linear_quantize`` with a fixed number of fractional bits ``frac_bits``."""

    name = "linear"

    @dataclass
    class Config(Quantizer.Config):
        frac_bits: Optional[int] = None
        """Fractional bits (the seed's ``sf``: step δ = 2^-frac_bits), -32..32; required."""
        bits: int = 8
        """Bit-width, 2..8."""

        def __post_init__(self) -> None:
            need(self.frac_bits is not None, "frac_bits",
                 "linear needs frac_bits (the seed's sf: δ = 2^-frac_bits)")
            need(-32 <= self.frac_bits <= 32, "frac_bits",
                 f"must be in [-32, 32]; got {self.frac_bits}")
            _check_bits(self.bits, 2, 8)

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.frac_bits, self.bits = self.cfg.frac_bits, self.cfg.bits

    def quantize(self, x: Tensor) -> Tensor:
        return _linear_codes(x, 2.0 ** -self.frac_bits, self.bits, ste=True) * 2.0 ** -self.frac_bits

    def encode(self, w: Tensor) -> Affine:
        d = 2.0 ** -self.frac_bits
        return _affine_rows(_linear_codes(w, d, self.bits, ste=False), d, self.bits, w)


@register
class DynamicFixed(Quantizer):
    """Ristretto dynamic fixed point: fl = bits − (⌈log2 max|x|⌉ + 1); max|x| per tensor per call,
    or (activations, ``momentum`` set) from an EMA range committed by ``qat_step``."""

    name = "dynamic_fixed"
    stateful = True  # only with an observer (stats() is None otherwise)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 8
        """Bit-width, 1..16 (1 bit: the codes {−1, 0})."""
        momentum: Optional[float] = None
        """Activations: keep the range as an EMA of the batch max|x| with this weight of the new
        batch, (0, 1]; null: the tensor's own max|x| at every call."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 1, 16)
            m = self.momentum
            need(m is None or 0 < m <= 1, "momentum", f"must be in (0, 1]; got {m}")

        def check_kind(self, kind: str) -> None:
            need(self.momentum is None or kind == "act", "momentum",
                 "only activations keep a range (a weight uses its own max|W| at every call)")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.momentum = self.cfg.bits, self.cfg.momentum
        m = self.momentum
        self.observer = EMARange(m, symmetric=True) if m is not None else None

    def describe(self) -> str:
        return f"{self.name}(bits={self.bits}" + (
            f", momentum={self.momentum})" if self.momentum is not None else ")")

    def delta(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            _, m = self.observer.range(x, self.recording)
        else:
            m = x.detach().abs().amax()
        il = torch.ceil(torch.log2(m.clamp(min=2.0 ** -100))) + 1  # integer length incl. sign
        return torch.exp2(il - self.bits)  # 2^-fl, fl = bits − il

    def quantize(self, x: Tensor) -> Tensor:
        d = self.delta(x)
        return _linear_codes(x, d, self.bits, ste=True) * d

    def encode(self, w: Tensor) -> Affine | Flex:
        d = self.delta(w)
        q = _linear_codes(w, d, self.bits, ste=False)
        if self.bits > 8:  # int16 codes times 2^-fl: Flexpoint's storage
            return Flex(q.reshape(w.shape[0], -1).to(torch.int16), int(torch.log2(d)))
        return _affine_rows(q, d, self.bits, w)

    def stats(self) -> Optional[Tensor]:
        return self.observer.stats() if self.observer is not None else None

    def commit(self, stats: Tensor) -> None:
        if self.observer is not None:
            self.observer.commit(stats)


@register
class QNNLinear(Quantizer):
    """QNN LinearQuant(x, s) = Clip(round(x/s)·s, minV, maxV). Defaults: s = 2^−(bits−1),
    minV = −2^(bits−1)·s, maxV = (2^(bits−1) − 1)·s (a signed bits-bit grid on [−1, 1))."""

    name = "qnn_linear"

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 8
        """Bit-width of the default grid, 2..16."""
        step: Optional[float] = None
        """The step s, > 0 (null: 2^−(bits−1))."""
        min_val: Optional[float] = None
        """The clip minV, a multiple of s (null: −2^(bits−1)·s)."""
        max_val: Optional[float] = None
        """The clip maxV, a multiple of s above minV, at most 256 levels (null:
        (2^(bits−1) − 1)·s)."""

        def __post_init__(self) -> None:
            _check_bits(self.bits, 2, 16)
            s, lo, hi = self.grid()
            need(s > 0, "step", f"must be > 0; got {s}")
            need(lo < hi, "max_val", f"must be > min_val={lo}; got {hi}")
            for key, v in (("min_val", lo), ("max_val", hi)):
                need(abs(v / s - round(v / s)) < 1e-6, key,
                     f"must be a multiple of step={s}; got {v}")
            lo_k, hi_k = round(lo / s), round(hi / s)
            need(hi_k - lo_k < 256, "step", f"gives {hi_k - lo_k + 1} levels in "
                 f"[{lo}, {hi}]; at most 256 (8-bit codes)")

        def grid(self) -> tuple[float, float, float]:
            """(step, min_val, max_val) with the defaults filled in."""
            s = self.step if self.step is not None else 2.0 ** -(self.bits - 1)
            lo = self.min_val if self.min_val is not None else -(2 ** (self.bits - 1)) * s
            hi = self.max_val if self.max_val is not None else (2 ** (self.bits - 1) - 1) * s
            return s, lo, hi

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits = self.cfg.bits
        self.step, self.min_val, self.max_val = self.cfg.grid()
        self.lo_k = round(self.min_val / self.step)
        self.hi_k = round(self.max_val / self.step)

    def quantize(self, x: Tensor) -> Tensor:
        return torch.clamp(round_ste(x / self.step), self.lo_k, self.hi_k) * self.step

    def storage_bits(self) -> Optional[float]:
        return max(1, math.ceil(math.log2(self.hi_k - self.lo_k + 1)))

    def encode(self, w: Tensor) -> Affine:
        q = torch.clamp(torch.round(w / self.step), self.lo_k, self.hi_k)
        bits = int(self.storage_bits())
        return Affine((q - self.lo_k).reshape(w.shape[0], -1).to(torch.uint8),
                      torch.full((w.shape[0],), float(self.step)),
                      torch.full((w.shape[0],), float(-self.lo_k)), bits)

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
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register, to_rows
from dqt.quant.codes import Affine, Flex
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


def _check_bits(args: dict[str, Any], lo: int = 2, hi: int = 8) -> None:
    b = args.get("bits")
    need(b is None or lo <= b <= hi, "bits", f"must be in [{lo}, {hi}]; got {b}")


@register
class Linear(Quantizer):
    """The seed's ``linear_quantize`` with a fixed number of fractional bits ``frac_bits``."""

    name = "linear"

    def __init__(self, kind: str, frac_bits: Optional[int] = None, bits: int = 8) -> None:
        super().__init__(kind)
        self.frac_bits, self.bits = frac_bits, bits

    @classmethod
    def check(cls, kind: str, args: dict[str, Any]) -> None:
        need(args.get("frac_bits") is not None, "frac_bits",
             "linear needs frac_bits (the seed's sf: δ = 2^-frac_bits)")
        need(-32 <= args["frac_bits"] <= 32, "frac_bits",
             f"must be in [-32, 32]; got {args['frac_bits']}")
        _check_bits(args)

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

    def __init__(self, kind: str, bits: int = 8, momentum: Optional[float] = None) -> None:
        super().__init__(kind)
        self.bits, self.momentum = bits, momentum
        self.observer = EMARange(momentum, symmetric=True) if momentum is not None else None

    @classmethod
    def check(cls, kind: str, args: dict[str, Any]) -> None:
        _check_bits(args, 1, 16)
        m = args.get("momentum")
        need(m is None or kind == "act", "momentum",
             "only activations keep a range (a weight uses its own max|W| at every call)")
        need(m is None or 0 < m <= 1, "momentum", f"must be in (0, 1]; got {m}")

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

    def __init__(self, kind: str, bits: int = 8, step: Optional[float] = None,
                 min_val: Optional[float] = None, max_val: Optional[float] = None) -> None:
        super().__init__(kind)
        self.bits = bits
        self.step = step if step is not None else 2.0 ** -(bits - 1)
        self.min_val = min_val if min_val is not None else -(2 ** (bits - 1)) * self.step
        self.max_val = max_val if max_val is not None else (2 ** (bits - 1) - 1) * self.step
        self.lo_k = round(self.min_val / self.step)
        self.hi_k = round(self.max_val / self.step)

    @classmethod
    def check(cls, kind: str, args: dict[str, Any]) -> None:
        _check_bits(args, 2, 16)
        q = cls(kind, **{k: v for k, v in args.items() if v is not None})
        need(q.step > 0, "step", f"must be > 0; got {q.step}")
        need(q.min_val < q.max_val, "max_val", f"must be > min_val={q.min_val}; got {q.max_val}")
        for key, v in (("min_val", q.min_val), ("max_val", q.max_val)):
            need(abs(v / q.step - round(v / q.step)) < 1e-6, key,
                 f"must be a multiple of step={q.step}; got {v}")
        need(q.hi_k - q.lo_k < 256, "step", f"gives {q.hi_k - q.lo_k + 1} levels in "
             f"[{q.min_val}, {q.max_val}]; at most 256 (8-bit codes)")

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

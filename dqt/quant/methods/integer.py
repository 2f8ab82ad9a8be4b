"""Integer quantization: symmetric INT-k and the affine UINT-k scheme of Jacob et al. 2018
("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", arXiv 1712.05877), r = S·(q − Z) — what TFLite and gemmlowp run.

* ``int``  (symmetric): S = max|r| / (2^(k−1) − 1), q = clamp(round(r/S), −(2^(k−1)−1),
  2^(k−1)−1) (narrow range, zero exactly representable); weights per tensor or per output
  channel (default), activations per tensor from an EMA of max|r|.
* ``uint`` (affine): [a, b] = the range nudged to contain 0, S = (b − a)/(2^k − 1),
  Z = clamp(round(−a/S), 0, 2^k − 1), q = clamp(round(r/S) + Z, 0, 2^k − 1), r̂ = S·(q − Z);
  weights from their own min/max (per channel by default), activations from EMA min/max.

Two further granularities, each computed from the current tensor (no EMA state):

* ``group_size`` G (weights): one scale (and zero point for ``uint``) per group of G consecutive
  values along each output row (the input dimension; conv weights flattened to in·kh·kw). ``int``
  per group follows torchao's ``IntxFakeQuantizeConfig(torch.int4, group_size=G)``:
  S = max(|w_g|) / ((2^k − 1)/2), clamped at fp32's smallest normal, q = clamp(round(w·(1/S)),
  −2^(k−1), 2^(k−1) − 1), ŵ = q·S. ``uint`` per group is its own scheme above on each group.
* ``per_token`` (activations): one scale per token (row of the last dimension). ``uint``:
  torchao's per-token asymmetric int8 (``IntxFakeQuantizeConfig(torch.int8, "per_token",
  is_symmetric=False)``): m = min(min x, 0), M = max(max x, 0), S = max((M − m)/(2^k − 1),
  smallest normal), Z = clamp(−round(m/S), 0, 2^k − 1), q = clamp(round(x·(1/S)) + Z, 0,
  2^k − 1), x̂ = (q − Z)·S — torchao's int8 codes are q − 128 with zero point Z − 128, the
  same x̂ bit for bit. ``int``: absmax (BitNet b1.58's activations): γ = max(max|x|, 1e−5),
  s = (2^(k−1) − 1)/γ, q = clamp(round(x·s), −2^(k−1), 2^(k−1) − 1), x̂ = q/s.

STE: identity inside the representable range, zero outside (the gradient of the clamp), the
scale is treated as a constant — as ``torch.fake_quantize_per_*_affine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, amax, need, per_channel_dims, register, to_rows
from dqt.quant.export.codes import Affine, AffineGroup
from dqt.quant.observers import EMARange
from dqt.quant.ste import round_ste

EPS = 1e-12
TINY = torch.finfo(torch.float32).tiny  # torchao's default eps for fp32: the smallest normal
TOKEN_EPS = 1e-5  # BitNet's floor on max|x| per token


def grouped(w: Tensor, g: int) -> Tensor:
    """A weight as (N, K/g, g): groups of g consecutive values along each output row."""
    return w.reshape(w.shape[0], -1, g)


@register
class IntSymmetric(Quantizer):
    name = "int"
    kinds = ("weight", "act")
    stateful = True
    quiet = {"group_size": 0, "per_token": False}

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 8
        """Bit-width k, 2..8."""
        per_channel: Optional[bool] = None
        """One scale per output channel (weights; null: per channel for weights, per tensor for
        activations, which are always per tensor)."""
        momentum: float = 0.1
        """Activations: weight of the new batch in the EMA of the range, (0, 1]."""
        group_size: Optional[int] = None
        """Weights: one scale per group of this many consecutive values along each output row
        (32, 64, 128, ...); the row length must be a multiple. 0 or null: per channel / tensor."""
        per_token: bool = False
        """Activations: one scale per token (row of the last dimension), computed from the
        current input (dynamic, no EMA)."""

        def __post_init__(self) -> None:
            need(2 <= self.bits <= 8, "bits", f"must be in [2, 8]; got {self.bits}")
            need(0 < self.momentum <= 1, "momentum", f"must be in (0, 1]; got {self.momentum}")
            need(self.group_size is None or self.group_size == 0 or self.group_size >= 2,
                 "group_size", f"must be >= 2 (or 0/null: no groups); got {self.group_size}")

        def check_kind(self, kind: str) -> None:
            need(not (kind == "act" and self.per_channel), "per_channel",
                 "activations are quantized per tensor")
            need(not (kind == "act" and self.group_size), "group_size",
                 "groups are for weights; activations take per_token")
            need(not (kind == "weight" and self.per_token), "per_token",
                 "per_token is for activations; weights take per_channel or group_size")
            need(not (self.group_size and self.per_channel is False), "per_channel",
                 "per_channel=false contradicts group_size (groups lie within each row)")

        def check_weight(self, shape: tuple[int, ...]) -> None:
            """Raise :class:`ArgError` when a weight of ``shape`` cannot take these arguments."""
            k = 1
            for d in shape[1:]:
                k *= d
            need(not self.group_size or (len(shape) > 1 and k % self.group_size == 0),
                 "group_size", f"{self.group_size} does not divide the {k} input values of "
                 f"each row of a weight of shape {list(shape)}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.momentum = c.bits, c.momentum
        self.per_channel = (kind == "weight") if c.per_channel is None else c.per_channel
        self.group_size, self.per_token = c.group_size or 0, c.per_token
        self.qmax = 2 ** (c.bits - 1) - 1
        dynamic = self.group_size or self.per_token
        self.observer = EMARange(c.momentum, symmetric=True) if kind == "act" and not dynamic \
            else None

    def _scale(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            _, hi = self.observer.range(x, self.recording)
            m = hi
        else:
            m = amax(x.detach(), self.per_channel)
        return torch.clamp(m, min=EPS) / self.qmax

    def _group_scale(self, wg: Tensor) -> Tensor:
        """torchao's symmetric scale of each group: max|w_g| / ((qmax − qmin)/2), eps-clamped."""
        m = wg.detach().abs().amax(dim=-1, keepdim=True)
        return torch.clamp(m / ((2 ** self.bits - 1) / 2), min=TINY)

    def quantize(self, x: Tensor) -> Tensor:
        if self.group_size and self.kind == "weight":
            xg = grouped(x, self.group_size)
            s = self._group_scale(xg)
            q = torch.clamp(round_ste(xg * (1.0 / s)), -self.qmax - 1, self.qmax)
            return (q * s).reshape(x.shape)
        if self.per_token:
            g = torch.clamp(x.detach().abs().amax(dim=-1, keepdim=True), min=TOKEN_EPS)
            s = self.qmax / g
            return torch.clamp(round_ste(x * s), -self.qmax - 1, self.qmax) / s
        s = self._scale(x)
        q = round_ste(torch.clamp(x / s, -self.qmax, self.qmax))
        return q * s

    def encode(self, w: Tensor) -> Affine | AffineGroup:
        if self.group_size:
            wg = grouped(w, self.group_size)
            s = self._group_scale(wg)
            q = torch.clamp(torch.round(wg * (1.0 / s)), -self.qmax - 1, self.qmax)
            zero = float(self.qmax + 1)
            return AffineGroup((q + zero).reshape(w.shape[0], -1).to(torch.uint8),
                               s.reshape(w.shape[0], -1), torch.full_like(s, zero).reshape(
                                   w.shape[0], -1), self.bits)
        s = self._scale(w)
        q = torch.round(torch.clamp(w / s, -self.qmax, self.qmax))
        zero = float(self.qmax + 1)
        codes = (q + zero).reshape(w.shape[0], -1).to(torch.uint8)
        return Affine(codes, to_rows(s, w), torch.full((w.shape[0],), zero), self.bits)

    def stats(self) -> Optional[Tensor]:
        return self.observer.stats() if self.observer is not None else None

    def commit(self, stats: Tensor) -> None:
        if self.observer is not None:
            self.observer.commit(stats)


@register
class UIntAffine(Quantizer):
    name = "uint"
    kinds = ("weight", "act")
    stateful = True
    quiet = IntSymmetric.quiet

    Config = IntSymmetric.Config

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.momentum = c.bits, c.momentum
        self.per_channel = (kind == "weight") if c.per_channel is None else c.per_channel
        self.group_size, self.per_token = c.group_size or 0, c.per_token
        self.qmax = 2 ** c.bits - 1
        dynamic = self.group_size or self.per_token
        self.observer = EMARange(c.momentum, symmetric=False) if kind == "act" and not dynamic \
            else None

    def _token_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """torchao's per-token asymmetric qparams (``choose_qparams_affine``), on [0, qmax]."""
        lo = torch.clamp(x.detach().amin(dim=-1, keepdim=True), max=0.0)
        hi = torch.clamp(x.detach().amax(dim=-1, keepdim=True), min=0.0)
        s = torch.clamp((hi - lo) / float(self.qmax), min=TINY)
        return s, torch.clamp(-torch.round(lo / s), 0, self.qmax)

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.group_size and self.kind == "weight":  # x: (N, K/g, g), one range per group
            lo, hi = x.detach().amin(dim=-1, keepdim=True), x.detach().amax(dim=-1, keepdim=True)
        elif self.observer is not None:
            lo, hi = self.observer.range(x, self.recording)
        elif self.per_channel and x.dim() > 1:
            d = per_channel_dims(x)
            lo, hi = x.detach().amin(dim=d, keepdim=True), x.detach().amax(dim=d, keepdim=True)
        else:
            lo, hi = x.detach().amin(), x.detach().amax()
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the range contains 0
        s = torch.clamp(hi - lo, min=EPS) / self.qmax
        z = torch.clamp(torch.round(-lo / s), 0, self.qmax)
        return s, z

    def quantize(self, x: Tensor) -> Tensor:
        if self.per_token:
            s, z = self._token_params(x)
            q = torch.clamp(round_ste(x * (1.0 / s)) + z, 0, self.qmax)
            return (q - z) * s
        xg = grouped(x, self.group_size) if self.group_size and self.kind == "weight" else x
        s, z = self._params(xg)
        q = torch.clamp(round_ste(xg / s) + z, 0, self.qmax)
        return (s * (q - z)).reshape(x.shape)

    def encode(self, w: Tensor) -> Affine | AffineGroup:
        if self.group_size:
            wg = grouped(w, self.group_size)
            s, z = self._params(wg)
            q = torch.clamp(torch.round(wg / s) + z, 0, self.qmax)
            n = w.shape[0]
            return AffineGroup(q.reshape(n, -1).to(torch.uint8), s.reshape(n, -1),
                               z.reshape(n, -1), self.bits)
        s, z = self._params(w)
        q = torch.clamp(torch.round(w / s) + z, 0, self.qmax)
        return Affine(q.reshape(w.shape[0], -1).to(torch.uint8), to_rows(s, w), to_rows(z, w),
                      self.bits)

    stats = IntSymmetric.stats
    commit = IntSymmetric.commit

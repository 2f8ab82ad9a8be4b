"""Integer quantization: symmetric INT-k and the affine UINT-k scheme of Jacob et al. 2018
("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", arXiv 1712.05877), r = S·(q − Z) — what TFLite and gemmlowp run.

* ``int``  (symmetric): S = max|r| / (2^(k−1) − 1), q = clamp(round(r/S), −(2^(k−1)−1),
  2^(k−1)−1) (narrow range, zero exactly representable); weights per tensor or per output
  channel (default), activations per tensor from an EMA of max|r|.
* ``uint`` (affine): [a, b] = the range nudged to contain 0, S = (b − a)/(2^k − 1),
  Z = clamp(round(−a/S), 0, 2^k − 1), q = clamp(round(r/S) + Z, 0, 2^k − 1), r̂ = S·(q − Z);
  weights from their own min/max (per channel by default), activations from EMA min/max.

STE: identity inside the representable range, zero outside (the gradient of the clamp), the
scale is treated as a constant — as ``torch.fake_quantize_per_*_affine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, amax, need, per_channel_dims, register, to_rows
from dqt.quant.export.codes import Affine
from dqt.quant.observers import EMARange
from dqt.quant.ste import round_ste

EPS = 1e-12


@register
class IntSymmetric(Quantizer):
    name = "int"
    kinds = ("weight", "act")
    stateful = True

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 8
        """Bit-width k, 2..8."""
        per_channel: Optional[bool] = None
        """One scale per output channel (weights; null: per channel for weights, per tensor for
        activations, which are always per tensor)."""
        momentum: float = 0.1
        """Activations: weight of the new batch in the EMA of the range, (0, 1]."""

        def __post_init__(self) -> None:
            need(2 <= self.bits <= 8, "bits", f"must be in [2, 8]; got {self.bits}")
            need(0 < self.momentum <= 1, "momentum", f"must be in (0, 1]; got {self.momentum}")

        def check_kind(self, kind: str) -> None:
            need(not (kind == "act" and self.per_channel), "per_channel",
                 "activations are quantized per tensor")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.momentum = c.bits, c.momentum
        self.per_channel = (kind == "weight") if c.per_channel is None else c.per_channel
        self.qmax = 2 ** (c.bits - 1) - 1
        self.observer = EMARange(c.momentum, symmetric=True) if kind == "act" else None

    def _scale(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            _, hi = self.observer.range(x, self.recording)
            m = hi
        else:
            m = amax(x.detach(), self.per_channel)
        return torch.clamp(m, min=EPS) / self.qmax

    def quantize(self, x: Tensor) -> Tensor:
        s = self._scale(x)
        q = round_ste(torch.clamp(x / s, -self.qmax, self.qmax))
        return q * s

    def encode(self, w: Tensor) -> Affine:
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

    Config = IntSymmetric.Config

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.momentum = c.bits, c.momentum
        self.per_channel = (kind == "weight") if c.per_channel is None else c.per_channel
        self.qmax = 2 ** c.bits - 1
        self.observer = EMARange(c.momentum, symmetric=False) if kind == "act" else None

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.observer is not None:
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
        s, z = self._params(x)
        q = torch.clamp(round_ste(x / s) + z, 0, self.qmax)
        return s * (q - z)

    def encode(self, w: Tensor) -> Affine:
        s, z = self._params(w)
        q = torch.clamp(torch.round(w / s) + z, 0, self.qmax)
        return Affine(q.reshape(w.shape[0], -1).to(torch.uint8), to_rows(s, w), to_rows(z, w),
                      self.bits)

    stats = IntSymmetric.stats
    commit = IntSymmetric.commit

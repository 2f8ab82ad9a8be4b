"""EMA range observer for activations (Jacob et al. 2018, §3.1: "exponential moving averages
(EMA) of the min/max of activations observed during training").

Kept in buffers (``lo``, ``hi``, ``initialized``), so checkpoints carry them. The forward pass
only *reads* the range (the batch's own range until the first commit) and *records* this rank's
batch min/max; :func:`dqt.quant.prepare.qat_step` MAX-reduces the records over ranks once per
optimizer step (the global batch range, identical on every rank) and :meth:`commit` folds it in:
``range ← (1 − momentum)·range + momentum·batch_range``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class EMARange(nn.Module):
    def __init__(self, momentum: float, symmetric: bool) -> None:
        super().__init__()
        self.momentum, self.symmetric = momentum, symmetric
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._pending: Optional[Tensor] = None

    def range(self, x: Tensor, record: bool) -> tuple[Tensor, Tensor]:
        """(lo, hi) to quantize ``x`` with; records x's range when ``record``."""
        xd = x.detach()
        if self.symmetric:
            m = xd.abs().amax()
            batch_lo, batch_hi = -m, m
        else:
            batch_lo, batch_hi = xd.amin(), xd.amax()
        if record:
            s = torch.stack([-batch_lo, batch_hi]).float()
            self._pending = s if self._pending is None else torch.maximum(self._pending, s)
        lo = torch.where(self.initialized, self.lo, batch_lo)
        hi = torch.where(self.initialized, self.hi, batch_hi)
        return lo, hi

    def stats(self) -> Tensor:
        out = self._pending if self._pending is not None else torch.full((2,), -float("inf"))
        self._pending = None
        return out

    def commit(self, stats: Tensor) -> None:
        if not bool(torch.isfinite(stats).all()):
            return  # nothing recorded on any rank
        lo, hi = -stats[0].to(self.lo), stats[1].to(self.hi)
        if not bool(self.initialized):
            self.lo.copy_(lo), self.hi.copy_(hi)
            self.initialized.fill_(True)
        else:
            m = self.momentum
            self.lo.mul_(1 - m).add_(m * lo)
            self.hi.mul_(1 - m).add_(m * hi)

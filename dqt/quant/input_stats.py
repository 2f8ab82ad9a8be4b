"""The input covariance S = XXᵀ/rows of a weight quantizer's layer, for methods that fit the
quantized weight to the layer's response on its own inputs (BWNH's hashing, Q-CNN's error
correction): ‖Xᵀ(w − ŵ)‖² = (w − ŵ)ᵀ S (w − ŵ) per output channel.

A forward pre-hook on the layer records Σ xxᵀ over the batch rows — Linear: every row;
Conv2d: every im2col patch (``F.unfold``, aligned with ``weight.reshape(N, -1)``), at most
4096 per batch, evenly strided — and their count while training. ``qat_step`` SUM-reduces them
over the ranks (``reduce = "sum"``) and ``commit`` keeps S as an EMA (``momentum``) of XXᵀ/rows
plus a ridge 10⁻³·tr(S)/K·I, so S is definite and identical on every rank. S is a
non-persistent buffer (neither exported nor checkpointed: a resumed run starts again from S = I
and re-learns it from the next batch). Layers whose inputs are not recorded (Conv1d/3d,
Embedding) and every layer before its first commit use S = I.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqt.quant.base import Quantizer

MAX_ROWS = 4096
RIDGE = 1e-3


def input_rows(layer: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The layer input as rows aligned with ``weight.reshape(N, -1)`` (None: not supported)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(layer, nn.Conv2d) and isinstance(layer.padding, tuple):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


class InputCovariance(Quantizer):
    """Base of weight quantizers that use S; ``records`` says whether this one does. Their
    ``Config`` has a ``momentum`` field (the EMA weight of the new S)."""

    stateful = True
    reduce = "sum"

    def __init__(self, kind: str, cfg: Optional[Quantizer.Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.momentum = self.cfg.momentum
        self.register_buffer("S", torch.zeros(0), persistent=False)  # empty: S = I
        self._sum: Optional[Tensor] = None
        self._rows = 0

    @property
    def records(self) -> bool:
        return True

    def covariance(self, k: int, device: torch.device) -> Tensor:
        return self.S if self.S.shape == (k, k) else torch.eye(k, device=device)

    def bind(self, layer: nn.Module) -> None:
        super().bind(layer)
        layer.register_forward_pre_hook(self._record)

    def _record(self, layer: nn.Module, args: tuple) -> None:
        if not (self.records and self.recording and args[0].is_floating_point()):
            return
        with torch.no_grad():
            x = input_rows(layer, args[0].detach().float())
            if x is None:
                return
            if x.shape[0] > MAX_ROWS:
                x = x[:: -(-x.shape[0] // MAX_ROWS)]
            xx = x.t() @ x
            self._sum = xx if self._sum is None else self._sum + xx
            self._rows += x.shape[0]

    def stats(self) -> Optional[Tensor]:
        if self._sum is None:
            return None
        out = torch.cat([self._sum.reshape(-1).cpu(), torch.tensor([float(self._rows)])])
        self._sum, self._rows = None, 0
        return out

    def commit(self, stats: Tensor) -> None:
        k = int(round((stats.numel() - 1) ** 0.5))
        rows = float(stats[-1])
        if rows <= 0:
            return
        new = stats[:-1].reshape(k, k) / rows
        new = new + RIDGE * torch.diagonal(new).mean() * torch.eye(k)
        dev = self.S.device
        if self.S.shape != (k, k):
            self.S = new.to(dev)
        else:
            self.S = (1 - self.momentum) * self.S + self.momentum * new.to(dev)

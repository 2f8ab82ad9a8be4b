"""Compressed gradients in PyTorch Lightning: a callback.

    from dqt.integrations.lightning import DQTCompression
    trainer = L.Trainer(strategy="ddp", devices=2, callbacks=[DQTCompression(comm.TernaryGrad())])

Why a callback and not ``DDPStrategy(ddp_comm_hook=...)``: a dqt scheme is built after
``init_process_group`` (it makes a process group of its own), and its per-rank state (error
feedback) must go into the checkpoint, which Lightning writes from rank 0 only. The callback

* attaches the scheme in ``on_fit_start``, once the strategy has wrapped the module in DDP
  (any ``DDPStrategy``; anything else is refused with one message);
* wires the preconditioner when the optimizer is :class:`dqt.optim.FrozenVarianceAdamW` (the
  codec then compresses in Adam's units, as the trainer does);
* under fp16 AMP passes the ``GradScaler``'s scale to the scheme before every backward;
* on ``on_save_checkpoint`` (every rank builds the checkpoint dict) gathers every rank's
  scheme state into the checkpoint under ``"dqt_compression"``, a list indexed by rank, and on
  resume gives each rank its own entry back; a checkpoint from another world size is refused.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dqt.comm as comm
from dqt.optim import FrozenVarianceAdamW

KEY = "dqt_compression"


class DQTCompression(pl.Callback):
    """Compress the gradient all-reduce of a Lightning DDP run with a dqt scheme.

    Args:
        config: a scheme config (``dqt.comm.OneBit()``, ``TernaryGrad()``, ...) or a preset
            name (``"ternary_grad"``).

    After ``fit`` starts, :attr:`scheme` is the attached scheme (``stats()`` for its bytes).
    """

    def __init__(self, config: Any) -> None:
        if isinstance(config, str):
            config = comm.preset(config)
        self.config = config
        self.scheme: comm.Scheme | None = None
        self._pending: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(f"DQTCompression compresses DDP's all-reduce: use strategy='ddp' "
                            f"(or a DDPStrategy); the strategy is "
                            f"{type(trainer.strategy).__name__} and its model a "
                            f"{type(model).__name__}")
        self.scheme = comm.compress(model, self.config)
        optimizers = trainer.optimizers
        if hasattr(self.scheme, "set_preconditioner") and len(optimizers) == 1 and \
                isinstance(optimizers[0], FrozenVarianceAdamW):
            self.scheme.set_preconditioner(optimizers[0].preconditioner, optimizers[0].step_bound)
        if self._pending is not None:
            self.scheme.load_state_dict(self._pending)
            self._pending = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: Any) -> None:
        """Under fp16 AMP (Lightning's ``MixedPrecision`` with a ``GradScaler``), tell the
        scheme the loss scale of this backward: error feedback keeps its residuals, and the
        preconditioner's clamp its bound, in unscaled units."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.scheme is not None and scaler is not None and scaler.is_enabled():
            self.scheme.set_grad_scale(scaler.get_scale())

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.scheme is None:
            return
        states: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(states, self.scheme.state_dict())  # every rank builds the dict
        checkpoint[KEY] = states

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(KEY)
        if states is None:
            return
        if len(states) != trainer.world_size:
            raise ValueError(f"the checkpoint holds the dqt scheme state of {len(states)} ranks; "
                             f"this run has {trainer.world_size} (error feedback is per rank)")
        state = states[trainer.global_rank]
        if self.scheme is None:
            self._pending = state  # restored before on_fit_start: applied once attached
        else:
            self.scheme.load_state_dict(state)

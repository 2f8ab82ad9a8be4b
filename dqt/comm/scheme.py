"""The contract between the trainer and a gradient-communication scheme.

A scheme attaches itself to a ``DistributedDataParallel`` model as a DDP communication hook,
counts what it hands to collectives in a :class:`~dqt.comm.meter.CommMeter`, and keeps its
per-rank state (error-feedback residuals, PowerSGD factors, ...) in ``state_dict`` so the
trainer checkpoints it per rank. ``SCHEMES`` maps ``scheme.name`` to a builder
``(cfg, process_group) -> Scheme``; every registered name has a ``conf/scheme/NAME.yaml``
and is exercised by tests parametrized over the registry.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dqt.comm.meter import CommMeter
from dqt.registry import Registry


class Scheme:
    name = "base"

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        # A communicator of its own: the scheme's traffic is separable (and countable) from
        # the trainer's, and its collectives never interleave with the trainer's.
        self.process_group = process_group if process_group is not None else dist.new_group()
        self.meter = CommMeter()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def attach(self, model: DistributedDataParallel) -> None:
        raise NotImplementedError

    def set_grad_scale(self, scale: float) -> None:
        """The loss scale of the coming backward (GradScaler); schemes with state use it."""

    def stats(self) -> dict[str, float]:
        """Communication figures since the last call (bytes, ratio, times)."""
        return self.meter.pop()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


SchemeBuilder = Callable[[Any, "dist.ProcessGroup | None"], Scheme]
SCHEMES: Registry[SchemeBuilder] = Registry("scheme.name")


def build_scheme(cfg: Any, process_group: dist.ProcessGroup | None = None) -> Scheme:
    """``cfg`` is a SchemeConfig, or None for plain (counted) DDP all-reduce."""
    name = "allreduce" if cfg is None else cfg.name
    return SCHEMES.get(name)(cfg, process_group)

"""The contract between the trainer and a gradient-communication scheme.

A scheme attaches itself to a ``DistributedDataParallel`` model as a DDP communication hook,
counts what it hands to collectives in a :class:`~dqt.comm.meter.CommMeter`, and keeps its
per-rank state (error-feedback residuals, PowerSGD factors, ...) in ``state_dict`` so the
trainer checkpoints it per rank. ``SCHEMES`` maps a scheme's config class (:mod:`dqt.comm.config`) to a builder
``(cfg, process_group) -> Scheme``; every registered name has a ``conf/scheme/NAME.yaml``
and is exercised by tests parametrized over the registry.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dqt.comm.meter import CommMeter


def world_timeout() -> "datetime.timedelta | None":
    """The default group's timeout (``init_process_group(timeout=...)``, the trainer's
    ``backend.timeout_s``). A new group otherwise gets the backend's default (30 minutes on
    gloo) and a frozen peer would hold the scheme's collectives that long."""
    world = dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return world._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001 - no such backend on this group, or no options
            continue
    return None


class Scheme:
    """A gradient-communication scheme attached to a DDP model (what :func:`dqt.comm.compress`
    returns). Its methods: :meth:`attach` (done by ``compress``), :meth:`stats` (bytes and times
    since the last call), :meth:`state_dict` / :meth:`load_state_dict` (its per-rank state:
    error-feedback residuals, PowerSGD factors, its step; save one file per rank),
    :meth:`set_grad_scale` (the loss scale of the coming backward under a ``GradScaler``).
    ``process_group``: the ranks it averages over (by default a new group of all ranks)."""

    name = "base"

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        # A communicator of its own: the scheme's traffic is separable (and countable) from
        # the trainer's, and its collectives never interleave with the trainer's.
        self.process_group = process_group if process_group is not None else \
            dist.new_group(timeout=world_timeout())
        self.meter = CommMeter()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def attach(self, model: DistributedDataParallel) -> None:
        """Register the scheme as ``model``'s communication hook."""
        raise NotImplementedError

    def set_grad_scale(self, scale: float) -> None:
        """The loss scale of the coming backward (GradScaler); schemes with state use it."""

    def stats(self) -> dict[str, float]:
        """Communication figures since the last call (bytes, ratio, times)."""
        return self.meter.pop()

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (differs between ranks: save it per rank)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned on this rank."""


SchemeBuilder = Callable[[Any, "dist.ProcessGroup | None"], Scheme]
SCHEMES: dict[type, SchemeBuilder] = {}
"""Config class → the builder of the scheme that runs it (the config class is the key);
``type(None)`` is plain all-reduce."""


def register_scheme(*config_classes: type) -> Callable[[SchemeBuilder], SchemeBuilder]:
    """Decorator: ``builder(cfg, process_group) -> Scheme`` runs these config classes."""

    def deco(builder: SchemeBuilder) -> SchemeBuilder:
        for cls in config_classes:
            if cls in SCHEMES:
                raise KeyError(f"scheme.name: {cls.__name__} is registered twice")
            SCHEMES[cls] = builder
        return builder

    return deco


def scheme_names() -> list[str]:
    """Every registered ``scheme.name`` (``allreduce`` = no ``+scheme``)."""
    return sorted("allreduce" if cls is type(None) else cls.NAME for cls in SCHEMES)


def build_scheme(cfg: Any, process_group: dist.ProcessGroup | None = None) -> Scheme:
    """The scheme of ``cfg``, a scheme config (:mod:`dqt.comm.config`), or None for plain
    (counted) DDP all-reduce. Call it after ``init_process_group``: the scheme makes a process
    group of its own."""
    builder = SCHEMES.get(type(cfg))
    if builder is None:
        known = ", ".join(c.__name__ for c in SCHEMES if c is not type(None))
        raise TypeError(f"build_scheme takes a scheme config ({known}) or None; got {cfg!r}")
    return builder(cfg, process_group)

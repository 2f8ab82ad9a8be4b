"""Data parallelism with a scheme: wrap a model so that its gradients are averaged over the
ranks through a gradient-communication scheme, whatever carries the collectives.

:func:`data_parallel` is the one place the trainer chooses the wrapper:

* ``torch.distributed`` backends (gloo, nccl): PyTorch's ``DistributedDataParallel`` with the
  scheme as its communication hook;
* ``horovod``: :class:`dqt.comm.horovod.HorovodDataParallel` (DDP's buckets, Horovod's
  collectives) running the same scheme maths (:mod:`dqt.comm.horovod`);
* ``parallel="fsdp"`` (``backend.parallel``): FSDP2's ``fully_shard`` (:func:`shard_model`), the
  scheme in its gradient reduce-scatter (:mod:`dqt.comm.fsdp`).

Each wrapper exposes ``.module`` (the user's model) and ``no_sync()`` like DDP.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dqt.comm.fsdp import FSDPCompression
from dqt.comm.horovod import HorovodDataParallel, build_horovod_scheme
from dqt.comm.scheme import Scheme, build_scheme

Wrapper = Callable[[nn.Module, Any, torch.device, "float | None"], "tuple[nn.Module, Scheme]"]


def _ddp(model: nn.Module, scheme: Any, device: torch.device,
         bucket_cap_mb: float | None) -> tuple[nn.Module, Scheme]:
    kw = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      **kw)
    return wrapped, scheme if isinstance(scheme, Scheme) else build_scheme(scheme)


def _horovod(model: nn.Module, scheme_cfg: Any, device: torch.device,
             bucket_cap_mb: float | None) -> tuple[nn.Module, Scheme]:
    return HorovodDataParallel(model, bucket_cap_mb), build_horovod_scheme(scheme_cfg)


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` ``model`` in place: every parameter-holding element of each
    ``nn.Sequential`` / ``nn.ModuleList`` (a layer, a transformer block; not their insides), then
    the root, which keeps the rest."""
    from torch.distributed.fsdp import fully_shard

    def units(module: nn.Module) -> list[nn.Module]:
        out = []
        for child in module.children():
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                out += [c for c in child.children() if any(True for _ in c.parameters())]
            else:
                out += units(child)
        return out

    for unit in units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


class FSDPDataParallel(nn.Module):
    """A ``fully_shard`` model behind DDP's surface: ``.module`` and ``no_sync()`` (gradient
    accumulation without the reduce-scatter, FSDP's ``set_requires_gradient_sync(False)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = shard_model(model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def _fsdp(model: nn.Module, scheme_cfg: Any, device: torch.device,
          bucket_cap_mb: float | None, gather: str = "fp32") -> tuple[nn.Module, Scheme]:
    wrapped = FSDPDataParallel(model)
    scheme = FSDPCompression(scheme_cfg, gather)
    scheme.attach(wrapped.module)
    return wrapped, scheme


WRAPPERS: dict[str, Wrapper] = {"gloo": _ddp, "nccl": _ddp, "horovod": _horovod}
"""Process-group backend → the data-parallel wrapper that carries its collectives."""


def data_parallel(model: nn.Module, scheme_cfg: Any, backend: str, device: torch.device,
                  bucket_cap_mb: float | None = None, parallel: str = "ddp",
                  fsdp_gather: str = "fp32") -> tuple[nn.Module, Scheme]:
    """Wrap ``model`` (already on ``device``) for data-parallel training over ``backend``
    (``gloo``, ``nccl`` or ``horovod``; the process group is initialised) and attach the scheme
    of ``scheme_cfg`` (a config of :mod:`dqt.comm.config`, None for plain all-reduce, or a
    built :class:`~dqt.comm.scheme.Scheme` such as an optimizer's
    :class:`~dqt.comm.onebit_adam.MomentumComm`). ``parallel``: ``ddp`` (every rank holds the
    model) or ``fsdp`` (``fully_shard``; gloo or nccl). Returns (the wrapped model, the
    scheme)."""
    if parallel == "fsdp":
        if backend == "horovod":
            raise ValueError("backend.parallel: fsdp runs over torch.distributed (gloo or "
                             "nccl), not horovod")
        return _fsdp(model, scheme_cfg, device, bucket_cap_mb, fsdp_gather)
    if backend not in WRAPPERS:
        raise ValueError(f"backend.name: no data-parallel wrapper for '{backend}'; "
                         f"available: {', '.join(WRAPPERS)}")
    wrapped, scheme = WRAPPERS[backend](model, scheme_cfg, device, bucket_cap_mb)
    scheme.attach(wrapped)
    return wrapped, scheme

"""Checkpoints of a sharded (FSDP2, ``backend.parallel=fsdp``) run through
``torch.distributed.checkpoint`` (DCP): the model, the optimizer and the scheme's error-feedback
residuals are written by every rank into ``<checkpoint>/dcp/`` (its shards only), and read back
on any number of ranks — DCP reshards the model and the optimizer; the residuals, one row per
saved rank, are restored exactly on the same number of ranks and as their mean on another
(:class:`dqt.comm.fsdp.FSDPCompression`). The rest of the checkpoint (step, scheduler, RNG) is
the same files as a DDP run's (:mod:`dqt.train.checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

DCP_DIR = "dcp"


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(model, FSDPModule)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def params_finite(model: nn.Module) -> bool:
    """Are this rank's parameters (its shards, under FSDP) finite?"""
    return all(bool(torch.isfinite(_local(p.detach())).all()) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors on CPU (gathers FSDP's shards: collective)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().cpu().clone()
    return out


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheme: Any) -> None:
    """Every rank writes its shards of the model, optimizer and scheme into ``path/dcp``."""
    import torch.distributed.checkpoint as dcp

    state = _state(model, optimizer)
    state["scheme"] = scheme.sharded_state_dict()
    dcp.save(state, checkpoint_id=os.path.join(path, DCP_DIR))


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheme: Any | None,
         saved_world: int, world: int, reshard_residuals: bool = True) -> None:
    """Restore what :func:`save` wrote (by ``saved_world`` ranks) into this run of ``world``
    ranks; ``scheme`` None: keep the scheme's fresh state (another scheme). On another number
    of ranks the residuals start from the saved ranks' mean, or from zero without
    ``reshard_residuals``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    if scheme is not None:
        state["scheme"] = scheme.sharded_state_dict() if saved_world == world else \
            scheme.resharded_template(saved_world)
    dcp.load(state, checkpoint_id=os.path.join(path, DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    if scheme is not None:
        if saved_world == world:
            scheme.load_sharded_state_dict(state["scheme"])
        else:
            scheme.load_resharded(state["scheme"], mean=reshard_residuals)

"""Atomic checkpoints with per-rank state, and automatic resume.

Layout of ``<run_dir>/checkpoints/step_0000300/``::

    meta.json      {"step", "world_size", "time"} — written last, by rank 0
    train.pt       model, optimizer, LR scheduler, grad scaler, step (rank 0; replicated state)
    rank0.pt ...   per rank: RNG states and the scheme's state (error-feedback residuals,
                   PowerSGD factors) — these differ between ranks and are never deduplicated

All ranks write into ``.tmp-step_0000300/``; after a barrier rank 0 writes ``meta.json`` and
renames the directory into place. A rename is atomic, so a ``step_*`` directory is always
complete; a crash leaves at most a ``.tmp-*`` directory, which the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dqt.config import CheckpointConfig
from dqt.errors import ConfigError

_STEP_DIR = re.compile(r"^step_(\d{7})$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.partial"
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class Checkpoint:
    path: str
    step: int
    world_size: int


class Checkpointer:
    def __init__(self, run_dir: str, rank: int, world_size: int, cfg: CheckpointConfig) -> None:
        self.root = os.path.join(run_dir, "checkpoints")
        self.rank, self.world_size, self.cfg = rank, world_size, cfg

    # ------------------------------------------------------------------ discovery
    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint in the run directory, or None."""
        if not os.path.isdir(self.root):
            return None
        best = None
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            meta = os.path.join(self.root, name, "meta.json")
            if m and os.path.isfile(meta):
                step = int(m.group(1))
                if best is None or step > best[0]:
                    best = (step, name, meta)
        if best is None:
            return None
        with open(best[2]) as f:
            meta = json.load(f)
        return Checkpoint(os.path.join(self.root, best[1]), meta["step"], meta["world_size"])

    def latest_step(self) -> int | None:
        ckpt = self.latest()
        return None if ckpt is None else ckpt.step

    def check_world_size(self, ckpt: Checkpoint) -> bool:
        """True if per-rank state can be restored; raises if the change is not allowed."""
        if ckpt.world_size == self.world_size:
            return True
        if not self.cfg.allow_world_size_change:
            raise ConfigError(
                "checkpoint.allow_world_size_change",
                f"{ckpt.path} was written by {ckpt.world_size} rank(s) but this run has "
                f"{self.world_size}. Resume with {ckpt.world_size} rank(s), or set "
                "checkpoint.allow_world_size_change=true to restore the model and optimizer only "
                "(per-rank scheme state and RNG are reset; the data order changes), or start a "
                "new run directory.")
        return False

    # ------------------------------------------------------------------ save / load
    def save(self, step: int, shared: dict[str, Any], per_rank: dict[str, Any]) -> str:
        name = f"step_{step:07d}"
        tmp, final = os.path.join(self.root, f".tmp-{name}"), os.path.join(self.root, name)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        if self.rank == 0:
            _atomic_torch_save(shared, os.path.join(tmp, "train.pt"))
        _atomic_torch_save(per_rank, os.path.join(tmp, f"rank{self.rank}.pt"))
        dist.barrier()
        if self.rank == 0:
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"step": step, "world_size": self.world_size, "time": time.time()}, f)
            if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            self._prune()
        dist.barrier()
        return final

    def load(self, ckpt: Checkpoint, with_rank_state: bool) -> tuple[dict[str, Any], dict | None]:
        shared = torch.load(os.path.join(ckpt.path, "train.pt"), map_location="cpu",
                            weights_only=False)
        per_rank = None
        if with_rank_state:
            per_rank = torch.load(os.path.join(ckpt.path, f"rank{self.rank}.pt"),
                                  map_location="cpu", weights_only=False)
        return shared, per_rank

    def _prune(self) -> None:
        steps = sorted(n for n in os.listdir(self.root) if _STEP_DIR.match(n))
        for name in steps[: max(0, len(steps) - self.cfg.keep)]:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


# ---------------------------------------------------------------------- weights of another run
_QUANT_STATE = re.compile(r"(^|\.)(parametrizations|input_quantizer|grad_quantizer)\.")
_ORIGINAL = ".parametrizations.weight.original"


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict as the model *without* quantizers names it: a parametrized weight's
    ``X.parametrizations.weight.original`` (the real, unquantized weight) becomes ``X.weight``;
    quantizer state (EMA ranges, LSQ steps, ...) is dropped."""
    out = {}
    for k, v in state.items():
        if k.endswith(_ORIGINAL):
            out[k[: -len(_ORIGINAL)] + ".weight"] = v
        elif not _QUANT_STATE.search(k):
            out[k] = v
    return out


def load_weights(model: torch.nn.Module, path: str, key: str) -> str:
    """Load the model weights of a run directory or ``checkpoints/step_*`` directory into
    ``model`` (built without quantizers; any qat config the run had is stripped). A missing path
    or weights of another model raise :class:`ConfigError` naming ``key``. Returns the
    checkpoint directory."""
    from dqt.train.export import find_checkpoint

    if not os.path.exists(path):
        raise ConfigError(key, f"{path} does not exist (a run directory or one of its "
                          "checkpoints/step_* directories)")
    try:
        ckpt, _ = find_checkpoint(path)
    except FileNotFoundError as e:
        raise ConfigError(key, str(e)) from None
    state = plain_state_dict(torch.load(os.path.join(ckpt, "train.pt"), map_location="cpu",
                                        weights_only=False)["model"])
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} here {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what}: {', '.join(ks[:4])}{' ...' if len(ks) > 4 else ''}"
                 for what, ks in (("missing", missing), ("unexpected", unexpected),
                                  ("shape", shapes)) if ks]
        raise ConfigError(key, f"{ckpt} holds the weights of a different model ({'; '.join(parts)})"
                          "; pass the model (model=..., experiment=...) it was trained with")
    model.load_state_dict(state)
    return ckpt

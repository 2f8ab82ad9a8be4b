"""Atomic checkpoints with per-rank state, and automatic resume.

Layout of ``<run_dir>/checkpoints/step_0000300/``::

    meta.json      {"step", "world_size", "time", "sha256": {file: digest}} — written last,
                   by rank 0
    train.pt       model, optimizer, LR scheduler, grad scaler, step (rank 0; replicated state)
    rank0.pt ...   per rank: RNG states and the scheme's state (error-feedback residuals,
                   PowerSGD factors) — these differ between ranks and are never deduplicated

All ranks write into ``.tmp-step_0000300/``; after a barrier rank 0 writes ``meta.json`` and
renames the directory into place. A rename is atomic, so a ``step_*`` directory is always
complete; a crash leaves at most a ``.tmp-*`` directory, which the next save removes.

Resume takes the newest checkpoint whose files all match the digests in its ``meta.json``; a
damaged one (truncated, overwritten, a file missing) is named in a warning and skipped. Every
rank verifies every file, so all ranks choose the same checkpoint without communicating.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from dqt.config import CheckpointConfig
from dqt.errors import ConfigError, NoSpace, no_space
from dqt.train.sharded import DCP_DIR

_STEP_DIR = re.compile(r"^step_(\d{7})$")
log = logging.getLogger("dqt")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _nbytes(obj: Any) -> int:
    """The tensor bytes in a nested checkpoint object (what writing it needs, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through ``path.partial`` and a rename; a full disk raises
    :class:`NoSpace` naming ``path`` (the partial file removed)."""
    tmp = f"{path}.partial"
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not no_space(e):
            raise
        free = shutil.disk_usage(os.path.dirname(path)).free
        raise NoSpace(f"no space left on device writing {path} (need ~{_nbytes(obj) / 1e6:.1f} "
                      f"MB, {free / 1e6:.1f} MB free)") from None
    os.replace(tmp, path)


def remove_stale(run_dir: str) -> list[str]:
    """Remove what an interrupted write left in ``run_dir`` (``checkpoints/.tmp-step_*``
    directories and ``*.partial`` files); returns their paths. Rank 0, at start-up, before
    anything is written."""
    stale = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.endswith(".partial")]
    root = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(root):
        stale += [os.path.join(root, n) for n in os.listdir(root) if n.startswith(".tmp-")]
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return stale


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
        """The newest complete, undamaged checkpoint in the run directory, or None. Damaged
        ones are skipped with a warning naming the file."""
        damaged = []
        for step, name in self._complete():
            path = os.path.join(self.root, name)
            try:
                with open(os.path.join(path, "meta.json")) as f:
                    meta = json.load(f)
                problem = _damage(path, meta)
            except (OSError, ValueError, KeyError) as e:
                meta, problem = None, f"meta.json unreadable ({e})"
            if problem is None:
                return Checkpoint(path, meta["step"], meta["world_size"])
            log.warning("checkpoint %s is damaged (%s); skipped, trying an older one", path,
                        problem)
            damaged.append(f"{path} ({problem})")
        if damaged:  # never start over silently in a directory that holds a run
            raise ConfigError("checkpoint.resume", "every checkpoint of this run directory is "
                              f"damaged: {'; '.join(damaged)}. Set checkpoint.resume=false to "
                              "start over here, or use a new hydra.run.dir")
        return None

    def _complete(self) -> list[tuple[int, str]]:
        """(step, directory name) of the checkpoints that have their ``meta.json`` (written
        last), newest first."""
        if not os.path.isdir(self.root):
            return []
        found = [(int(m.group(1)), n) for n in os.listdir(self.root)
                 if (m := _STEP_DIR.match(n)) and os.path.isfile(os.path.join(self.root, n,
                                                                              "meta.json"))]
        return sorted(found, reverse=True)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint (not verified: cheap)."""
        complete = self._complete()
        return complete[0][0] if complete else None

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
    def save(self, step: int, shared: dict[str, Any], per_rank: dict[str, Any],
             sharded: Callable[[str], None] | None = None) -> str:
        """Write checkpoint ``step``: ``shared`` (rank 0's ``train.pt``), each rank's
        ``per_rank`` (``rank{r}.pt``) and, with ``sharded``, what that collective writes into
        the checkpoint's directory (FSDP's DCP shards, :mod:`dqt.train.sharded`); every file's
        sha256 goes into ``meta.json``, written last."""
        name = f"step_{step:07d}"
        tmp, final = os.path.join(self.root, f".tmp-{name}"), os.path.join(self.root, name)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        own = os.path.join(tmp, f"rank{self.rank}.pt")
        try:
            if self.rank == 0:
                _atomic_torch_save(shared, os.path.join(tmp, "train.pt"))
            _atomic_torch_save(per_rank, own)
            mine: Any = (f"rank{self.rank}.pt", file_sha256(own))
        except NoSpace as e:
            mine = e

        digests: list[Any] = [None] * self.world_size  # every rank's file, for meta.json
        dist.all_gather_object(digests, mine)
        failed = [(r, d) for r, d in enumerate(digests) if isinstance(d, NoSpace)]
        if failed:  # every rank stops; the newest complete checkpoint is untouched
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self._complete()
            kept = f"the newest complete checkpoint (step {last[0][0]}) is intact" if last \
                else "no complete checkpoint exists yet"
            r, err = failed[0]
            need = _nbytes(shared) + self.world_size * _nbytes(per_rank)
            free = shutil.disk_usage(self.root).free
            raise NoSpace(f"rank {r}: {err.args[0].split(' (need')[0]} (checkpoint step {step} "
                          f"needs ~{need / 1e6:.2f} MB, {free / 1e6:.2f} MB free); {kept}")
        if sharded is not None:  # a collective: every rank got here
            try:
                sharded(tmp)
            except Exception as e:  # noqa: BLE001 - DCP re-raises every rank's error
                if not no_space(e) and "No space left" not in str(e):
                    raise
                raise NoSpace(f"no space left on device writing {tmp}/{DCP_DIR} (checkpoint "
                              f"step {step}); the newest complete checkpoint is intact") from None
        if self.rank == 0:
            sha = {"train.pt": file_sha256(os.path.join(tmp, "train.pt")), **dict(digests)}
            sub = os.path.join(tmp, DCP_DIR)
            if os.path.isdir(sub):  # the sharded state's files
                sha.update({f"{DCP_DIR}/{n}": file_sha256(os.path.join(sub, n))
                            for n in sorted(os.listdir(sub))})
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"step": step, "world_size": self.world_size, "time": time.time(),
                           "sha256": sha}, f)
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
        """Keep the ``checkpoint.keep`` newest complete checkpoints; a directory without its
        ``meta.json`` does not count (and goes once older than the newest complete one)."""
        complete = self._complete()
        keep = {n for _, n in complete[: self.cfg.keep]}
        newest = complete[0][0] if complete else -1
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            if m and name not in keep and (any(n == name for _, n in complete)
                                           or int(m.group(1)) < newest):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def _damage(path: str, meta: dict[str, Any]) -> str | None:
    """What is wrong with the checkpoint at ``path`` (a file missing or not matching its
    digest), or None. Checkpoints written before digests were recorded are checked for the
    files only."""
    files = meta.get("sha256") or {n: None for n in
                                   ["train.pt", *(f"rank{r}.pt" for r in range(meta["world_size"]))]}
    for name, digest in files.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            return f"{name} is missing"
        if digest is not None and file_sha256(f) != digest:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


# ---------------------------------------------------------------------- weights of another run
_QUANT_STATE = re.compile(r"(^|\.)(parametrizations|input_quantizer|grad_quantizer)\.")
_ORIGINAL = re.compile(r"\.parametrizations\.([^.]+)\.original$")


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict as the model *without* quantizers names it: a parametrized tensor's
    ``X.parametrizations.NAME.original`` (the real, unquantized weight: ``weight``, an
    attention's ``in_proj_weight``, ...) becomes ``X.NAME``; quantizer state (EMA ranges, LSQ
    steps, ...) is dropped."""
    out = {}
    for k, v in state.items():
        if m := _ORIGINAL.search(k):
            out[k[:m.start()] + "." + m.group(1)] = v
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

"""Shared helpers: run the real CLI (python or torchrun) in a subprocess, compose configs with
Hydra's compose API, read metrics and checkpoints of a run directory.

Without a GPU, Triton kernels are tested through Triton's interpreter, which must be switched on
before triton is first imported: this file sets ``TRITON_INTERPRET=1`` then (``docs/kernels.md``, the Triton kernels).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DQT_TRITON_AUTOTUNE", "0")  # tests check correctness, not tile choices

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TRAIN = str(REPO / "launch" / "train.py")


def rank_process(body):
    """Decorator for a module-level ``mp.spawn`` rank function that initialises a process
    group: run ``body``, then, once its objects (DDP models and their reducers, schemes) are
    gone, tear the group down after a barrier, then leave with ``os._exit(0)`` without running
    interpreter-exit destructors. Twice in CI a rank of these tests aborted with "terminate
    called without an active exception" after writing its results; gloo objects destroyed late
    (a reducer still holding the group) or at interpreter exit are the suspects (not
    reproduced here)."""

    @functools.wraps(body)
    def rank_main(*args):
        body(*args)
        gc.collect()
        from dqt.train.distributed import teardown

        teardown(barrier=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return rank_main


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment minus anything a launcher would inject."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_",
                                "TORCHELASTIC", "DQT_RUN_DIR", "WANDB_"))}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def train_cmd(*overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, TRAIN, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", TRAIN, *overrides]


def run_train(*overrides: str, nproc: int = 1, cwd: Path | None = None, timeout: int = 300,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*overrides, nproc=nproc), cwd=cwd or REPO,
                          env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_step(run_dir: Path, step: int, timeout: float = 240, poll: float = 0.2) -> None:
    """Wait until a running job's metrics.jsonl has a train record at ``step`` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if any(r["kind"] == "train" and r["step"] >= step for r in read_metrics(run_dir)):
                return
        except (OSError, ValueError):  # not written yet, or a line half-written
            pass
        time.sleep(poll)
    raise AssertionError(f"{run_dir}: no train record at step >= {step} after {timeout} s")


def summary(run_dir: Path) -> dict[str, Any]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "summary"][-1]


def checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(root.glob("step_*")) if root.exists() else []


@pytest.fixture
def compose():
    """compose(*overrides) -> DictConfig, through Hydra's compose API on conf/."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dqt.config import register_configs
    from dqt.train.run_dir import register_resolvers

    register_configs()
    register_resolvers()

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose("train", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()

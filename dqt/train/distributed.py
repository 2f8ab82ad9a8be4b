"""Who am I in the job, and the process group — one code path for torchrun, plain ``srun`` and a
single process (the dinov2 ``TorchDistributedEnvironment`` pattern).

Detection order: torchrun/TorchElastic (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) → SLURM
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; master = first host of the job) → one process.
A single process still gets a (world size 1) process group, so DDP and communication hooks
run exactly as they do on many ranks.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dqt.config import BackendConfig, ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return "127.0.0.1"


def detect() -> DistEnv:
    """Read the launcher's environment; for SLURM also export the ``env://`` variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(world)
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        return DistEnv(rank, world, int(env["LOCAL_RANK"]), "slurm")
    return DistEnv(0, 1, 0, "single")


def resolve_backend(cfg: BackendConfig) -> str:
    if cfg.name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if cfg.name == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend", "backend=nccl needs CUDA, which this machine does not have; "
                          "use backend=gloo or backend=auto")
    return cfg.name


def init(env: DistEnv, cfg: BackendConfig) -> tuple[str, torch.device]:
    """Initialise the default process group; returns (backend, device of this rank)."""
    backend = resolve_backend(cfg)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if not dist.is_initialized():
        if env.launcher == "single":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
    return backend, device


def teardown(barrier: bool = False) -> None:
    """Destroy the default process group. ``barrier=True`` (normal exit) first waits for every
    rank, so no peer closes its gloo connections while another rank's last collective or hook
    future is still in flight (which aborts that rank with "terminate called without an active
    exception")."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()

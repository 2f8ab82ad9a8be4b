"""Who am I in the job, and the process group — one code path for torchrun, plain ``srun``,
submitit (on SLURM or local) and a single process (the dinov2 ``TorchDistributedEnvironment``
pattern).

Detection order: torchrun/TorchElastic (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) → horovodrun
(``HOROVOD_RANK``/``HOROVOD_SIZE``/``HOROVOD_LOCAL_RANK``) → submitit's
local executor (``SUBMITIT_LOCAL_GLOBALID``/``_NTASKS``/``_LOCALID``) → SLURM (``SLURM_PROCID``/
``SLURM_NTASKS``/``SLURM_LOCALID``: plain ``srun`` or submitit on SLURM; master = first host of the
job, at its ``NodeAddr`` from ``scontrol``) → one process.
A single process still gets a (world size 1) process group, so DDP and communication hooks
run exactly as they do on many ranks.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dqt.config import BackendConfig
from dqt.errors import ConfigError


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
    """The address SLURM reaches the job's first node at: its NodeAddr (by default its name)."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")

    def scontrol(*args: str) -> str:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    try:
        first = scontrol("show", "hostnames", nodes).split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "127.0.0.1"
    try:
        addr = re.search(r"\bNodeAddr=(\S+)", scontrol("show", "node", "-o", first))
    except (OSError, subprocess.SubprocessError):
        addr = None
    return addr.group(1) if addr else first


# (launcher, rank, world size, local rank): the variables each launcher gives its processes,
# in the order they are looked for. submitit's local executor runs a job's tasks as processes
# on this machine; a SLURM job step (srun, or submitit on SLURM) one process per task.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK"),
    ("submitit-local", "SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_NTASKS",
     "SUBMITIT_LOCAL_LOCALID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def from_env() -> DistEnv:
    """This process's place in the job, read from the launcher's variables (no side effects)."""
    env = os.environ
    for launcher, rank, world, local in _LAUNCHERS:
        if rank not in env:
            continue
        size = int(env.get(world, "1"))
        if (launcher == "torchrun" and world in env) or size > 1:
            return DistEnv(int(env[rank]), size, int(env.get(local, "0")), launcher)
    return DistEnv(0, 1, 0, "single")


def detect() -> DistEnv:
    """:func:`from_env`, and for launchers other than torchrun export the ``env://`` variables:
    the master is the job's first host (SLURM) or this machine, the port derived from the job id."""
    found = from_env()
    env = os.environ
    if found.launcher in ("slurm", "submitit-local"):
        if found.launcher == "slurm":
            env.setdefault("MASTER_ADDR", _slurm_master_addr())
            job = env.get("SLURM_JOB_ID", "0")
        else:
            env.setdefault("MASTER_ADDR", "127.0.0.1")
            job = env.get("SUBMITIT_LOCAL_JOB_ID", "0")
        env.setdefault("MASTER_PORT", str(20000 + int(job) % 20000))
        env["RANK"], env["WORLD_SIZE"] = str(found.rank), str(found.world_size)
        env["LOCAL_RANK"] = str(found.local_rank)
        if "OMP_NUM_THREADS" not in env:  # as torchrun does: no more threads than CPUs given
            env["OMP_NUM_THREADS"] = env.get("SLURM_CPUS_PER_TASK", "1")
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if found.launcher == "horovodrun" and "OMP_NUM_THREADS" not in env:
        # horovodrun, unlike torchrun, leaves every rank all the cores: share them out
        local = int(env.get("HOROVOD_LOCAL_SIZE", "1"))
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    return found


def resolve_backend(cfg: BackendConfig) -> str:
    if cfg.name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if cfg.name == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend", "backend=nccl needs CUDA, which this machine does not have; "
                          "use backend=gloo or backend=auto")
    return cfg.name


def _init_horovod(env: DistEnv, timeout: datetime.timedelta) -> None:
    """``hvd.init()``, then the control plane: a gloo process group for the trainer's small
    messages (metric sums, stop flag, QAT statistics, digests, checkpoint barriers), whose
    store rank 0 opens on a free port and announces with Horovod's ``broadcast_object``."""
    from dqt.comm.horovod import hvd_module

    hvd = hvd_module()
    hvd.init()
    if (hvd.rank(), hvd.size()) != (env.rank, env.world_size):
        raise ConfigError("backend", f"backend=horovod: Horovod sees rank {hvd.rank()} of "
                          f"{hvd.size()} but this process was started as rank {env.rank} of "
                          f"{env.world_size} by {env.launcher}; launch with horovodrun, e.g. "
                          "horovodrun -np 2 -H localhost:2 --gloo python launch/train.py "
                          "backend=horovod")
    if dist.is_initialized():
        return
    store = None
    if env.rank == 0:
        host = "127.0.0.1" if hvd.local_size() == hvd.size() else socket.gethostname()
        store = dist.TCPStore(host, 0, env.world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        where = (host, store.port)
    where = hvd.broadcast_object(where if env.rank == 0 else None, root_rank=0,
                                 name="dqt.control_plane")
    if store is None:
        store = dist.TCPStore(where[0], where[1], env.world_size, is_master=False,
                              timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timeout)


def init(env: DistEnv, cfg: BackendConfig) -> tuple[str, torch.device]:
    """Initialise the default process group; returns (backend, device of this rank)."""
    backend = resolve_backend(cfg)
    device = torch.device("cpu")
    if backend == "horovod":
        _init_horovod(env, datetime.timedelta(seconds=cfg.timeout_s))
        return backend, device
    if backend == "nccl":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if not dist.is_initialized():
        global _GROUPS
        if env.launcher == "single":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=_agent_store(timeout), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        _GROUPS += 1
    return backend, device


def check_shared_dir(path: str, rank: int, world: int) -> None:
    """Every rank must see the one run directory (checkpoints are written into it by all ranks
    and renamed into place by rank 0): rank 0 writes a token file there and every rank looks
    for it. Raises :class:`ConfigError` naming ``hydra.run.dir`` and the ranks that cannot see
    it, on every rank, before anything else is written."""
    import uuid

    from dqt.errors import ConfigError

    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(path, f".dqt-shared-{token[0]}")
    if rank == 0:
        with open(probe, "w") as f:
            f.write(token[0])
    dist.barrier()
    try:
        with open(probe) as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    views: list = [None] * world
    dist.all_gather_object(views, seen)
    if rank == 0:
        os.remove(probe)
    blind = [r for r, ok in enumerate(views) if not ok]
    if blind:
        raise ConfigError("hydra.run.dir", f"{path} is not shared by every rank: rank(s) "
                          f"{', '.join(map(str, blind))} cannot see a file rank 0 wrote there. "
                          "All ranks write checkpoints into one run directory: put it on a "
                          "filesystem every node mounts (hydra.run.dir=/shared/path)")


_GROUPS = 0  # process groups this process has made: the jobs of a sweep (-m) run in one process


def _agent_store(timeout: datetime.timedelta) -> dist.Store:
    """torchrun's agent store, as ``env://`` makes it (under the restart attempt's prefix, so an
    elastic restart never reads the failed attempt's keys), plus a prefix of its own for each
    process group of this process. The agent store outlives the jobs of a Hydra sweep run under
    torchrun; without that prefix the second job's rendezvous would read the first job's keys
    (its barrier count, its gloo addresses) and wait for ever. Every rank runs the same jobs in
    the same order, so the ranks agree on the prefix."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"/worker/attempt_{attempt}/dqt/group{_GROUPS}/", store)


_DRAIN_S = 0.2  # seconds without the GIL before the process groups go (see teardown)


def teardown(barrier: bool = False) -> None:
    """Destroy the default process group. ``barrier=True`` (normal exit) first waits for every
    rank, so no peer closes its gloo connections while another rank's last collective or hook
    future is still in flight (which aborts that rank with "terminate called without an active
    exception")."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        if dist.get_world_size() > 1:
            # Let gloo's worker threads finish releasing the last collectives' work (which
            # holds Python tensors: freeing them takes the GIL) before the process groups are
            # destroyed: ~ProcessGroupGloo joins those threads while this thread holds the GIL,
            # and a thread still waiting for it deadlocks the exit (seen on a loaded 2-core VM:
            # rank 0 idle in ~ProcessGroupGloo after "done"; and on the error path, a diverged
            # run's ranks stuck in ~Reducer → ~ProcessGroupGloo while a worker thread freed
            # the divergence check's all_gather).
            time.sleep(_DRAIN_S)
        dist.destroy_process_group()
    # Horovod (backend=horovod) stays initialized: the next job of a sweep in this process
    # reuses it, and Horovod shuts itself down at exit (a shutdown and re-init between sweep
    # jobs aborted a rank with SIGABRT in one of our test runs)

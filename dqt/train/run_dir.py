"""One run directory for all ranks, and the Hydra resolvers that make it so.

Hydra resolves ``${now:...}`` separately in every process (hydra#2070), so N ranks started by
torchrun would each create their own directory. ``${dqt_run_dir:BASE}`` picks, in order:

1. ``$DQT_RUN_DIR`` — set by a launcher script (SLURM requeues, elastic restarts, resuming);
2. ``BASE/slurm-$SLURM_JOB_ID[_$SLURM_ARRAY_TASK_ID]`` inside a SLURM job;
3. under torchrun with several ranks: rank 0 makes ``BASE/<date>/<time>`` and publishes it in
   torchrun's own TCPStore (the agent store every worker can reach); the other ranks read it;
   under horovodrun the same through horovodrun's rendezvous key-value server;
4. otherwise ``BASE/<date>/<time>`` of this process.

A sweep (``-m``, e.g. ``hydra/launcher=slurm``) does not use this: each sweep point runs in
``hydra.sweep.dir/hydra.sweep.subdir``, fixed when the sweep is launched (submitit pickles it with
the job), so a point's ranks and its requeued job share it too. ``${dqt_sweep_dir:BASE}`` (the
default ``hydra.sweep.dir``) is agreed through torchrun's / horovodrun's store as in 3. when
every rank runs the sweep itself (``torchrun ... launch/train.py -m ...``), else
``BASE/<date>/<time>``.

``${dqt_rank0_only:X}`` is X on rank 0 and null elsewhere; ``${dqt_hydra_subdir:DIR}`` is
where rank 0 writes Hydra's record of this attempt (``.hydra``, then ``.hydra/attempt_N``) and
null elsewhere;
``${dqt_rank0_level:L}`` is L on rank 0 and WARNING elsewhere (console noise from one rank);
``${dqt_rank:}`` is this process's global rank (per-rank log file names).
"""

from __future__ import annotations

import datetime
import functools
import os
import time

_KEY = "dqt/run_dir"


def env_rank() -> int:
    """This process's global rank under any launcher (dqt.train.distributed.from_env)."""
    from dqt.train.distributed import from_env

    return from_env().rank


def _timestamped(base: str) -> str:
    now = datetime.datetime.now()
    return os.path.join(base, now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S"))


def _agreed_through_torchrun_store(base: str, key: str = _KEY) -> str | None:
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1 or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed import TCPStore

    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                     timeout=datetime.timedelta(seconds=300))
    if env_rank() == 0:
        store.set(key, _timestamped(base))
    return store.get(key).decode()


def _agreed_through_horovodrun(base: str, key: str = "run_dir") -> str | None:
    env = os.environ
    if int(env.get("HOROVOD_SIZE", "1")) <= 1 or "HOROVOD_GLOO_RENDEZVOUS_ADDR" not in env:
        return None
    from horovod.runner.http.http_client import put_data_into_kvstore, read_data_from_kvstore

    where = (env["HOROVOD_GLOO_RENDEZVOUS_ADDR"], int(env["HOROVOD_GLOO_RENDEZVOUS_PORT"]))
    if env_rank() == 0:
        put_data_into_kvstore(*where, "dqt", key, _timestamped(base))
    deadline = time.monotonic() + 300
    while True:
        try:
            return read_data_from_kvstore(*where, "dqt", key)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@functools.lru_cache(maxsize=None)
def run_dir(base: str = "outputs") -> str:
    if os.environ.get("DQT_RUN_DIR"):
        return os.environ["DQT_RUN_DIR"]
    if os.environ.get("SLURM_JOB_ID"):
        job = os.environ["SLURM_JOB_ID"]
        if os.environ.get("SLURM_ARRAY_TASK_ID"):
            job += "_" + os.environ["SLURM_ARRAY_TASK_ID"]
        return os.path.join(base, f"slurm-{job}")
    return (_agreed_through_torchrun_store(base) or _agreed_through_horovodrun(base)
            or _timestamped(base))


@functools.lru_cache(maxsize=None)
def sweep_dir(base: str = "multirun") -> str:
    """``hydra.sweep.dir``: the ranks of a sweep (``-m``) run under torchrun or horovodrun agree
    on it as on a run directory (each rank runs the sweep; ``${now:}`` would differ where they
    straddle a second); a submitit sweep's single launching process takes BASE/<date>/<time>."""
    return (_agreed_through_torchrun_store(base, "dqt/sweep_dir")
            or _agreed_through_horovodrun(base, "sweep_dir") or _timestamped(base))


_SUBDIRS: dict[str, str] = {}


def hydra_subdir(output_dir: str) -> str | None:
    """Where rank 0 writes Hydra's record of this attempt (``hydra.output_subdir``; other
    ranks write none): ``.hydra`` for a run directory's first attempt, ``.hydra/attempt_N``
    for its N-th, so a resume (or a refused one) never overwrites an earlier attempt's
    record."""
    if env_rank() != 0:
        return None
    if output_dir not in _SUBDIRS:  # Hydra may resolve this more than once per job
        base = os.path.join(output_dir, ".hydra")
        if not os.path.exists(os.path.join(base, "config.yaml")):
            _SUBDIRS[output_dir] = ".hydra"
        else:
            n = 2
            while os.path.exists(os.path.join(base, f"attempt_{n}")):
                n += 1
            _SUBDIRS[output_dir] = f".hydra/attempt_{n}"
    return _SUBDIRS[output_dir]


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("dqt_run_dir", run_dir, replace=True)
    # use_cache: the value lands in the config's resolver cache, which Hydra's launchers copy
    # into every job's config (a submitit job, in another process, gets the launcher's value)
    OmegaConf.register_new_resolver("dqt_sweep_dir", sweep_dir, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("dqt_rank", env_rank, replace=True)
    OmegaConf.register_new_resolver(
        "dqt_rank0_only", lambda value: value if env_rank() == 0 else None, replace=True)
    OmegaConf.register_new_resolver("dqt_hydra_subdir", hydra_subdir, replace=True)
    OmegaConf.register_new_resolver(
        "dqt_rank0_level", lambda level: level if env_rank() == 0 else "WARNING", replace=True)

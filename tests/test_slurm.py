"""Cluster jobs against a real SLURM: munged, slurmctld and slurmd from Debian's packages, one
node with this machine's CPUs (``launch/slurm/local_cluster.sh``), real ``sbatch``/``srun``/
``scontrol``/``scancel`` and real torchrun.

- ``launch/slurm/train.sbatch`` trains 2 ranks to completion into ``outputs/slurm-<job id>``;
- ``sbatch --nodes=2`` on a second cluster of two nodes (two slurmd on this machine) makes one
  torchrun per node meet at the first node (c10d rendezvous);
- a job stopped by the time-limit signal (``scancel --signal=TERM``: what ``--signal=TERM@120``
  sends) and then by ``scontrol requeue`` checkpoints both times, is requeued, and resumes;
- Hydra's submitit launcher runs a 2-point sweep on SLURM (and a submitit preemption signal
  requeues a sweep job that resumes; a sweep job spans two nodes), and the same sweep locally
  (``hydra/launcher=local``).

A requeued job starts again by itself once SLURM's hold on it (AuthInfo's cred_expire, 10 s on
the local cluster, 120 s by default) has passed. The cluster tests are skipped, with the reason, without root
or without the packages; ``DQT_REQUIRE_SLURM=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (REPO, TRAIN, checkpoints, clean_env, read_metrics, summary,
                      wait_for_step)

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
CLUSTER = REPO / "launch" / "slurm" / "local_cluster.sh"
REQUIRED = os.environ.get("DQT_REQUIRE_SLURM") == "1"


def _has_submitit() -> bool:
    """find_spec of a submodule raises ModuleNotFoundError when its parent package
    (hydra_plugins, which only Hydra plugins install) is absent."""
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


HAS_SUBMITIT = _has_submitit()


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"DQT_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _need_submitit() -> None:
    if not HAS_SUBMITIT:
        _unavailable("Hydra's submitit launcher is not installed: pip install -e '.[slurm]'")


# --------------------------------------------------------------------------- no cluster needed
def test_rank_detection_one_code_path(monkeypatch):
    from dqt.train.distributed import DistEnv, from_env

    for k in list(os.environ):
        if k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(k)
    assert from_env() == DistEnv(0, 1, 0, "single")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job step (sbatch's shell, srun -n1)
    assert from_env() == DistEnv(0, 1, 0, "single")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert from_env() == DistEnv(5, 8, 1, "slurm")
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2",
             "SUBMITIT_LOCAL_LOCALID": "1"}
    for k, v in local.items():
        monkeypatch.setenv(k, v)
    assert from_env() == DistEnv(1, 2, 1, "submitit-local")
    for k, v in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)  # torchrun inside a SLURM step: torchrun's variables win
    assert from_env() == DistEnv(3, 4, 0, "torchrun")


def test_stop_signal_is_recorded_and_handed_on():
    """dqt records SIGTERM (and submitit's signal in a submitit job) instead of dying, and after
    the checkpoint calls the handler that was there before (submitit's requeue)."""
    code = """
import os, signal
calls = []
signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))   # e.g. submitit's handler
from dqt.train import preempt
preempt.install(); preempt.install()
assert not preempt.requested()
os.kill(os.getpid(), signal.SIGUSR2)
os.kill(os.getpid(), signal.SIGTERM)
assert preempt.requested() and preempt.received_name() == "SIGUSR2", preempt.received_name()
assert calls == []
preempt.handoff()
assert calls == [signal.SIGUSR2], calls
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=clean_env(SUBMITIT_EXECUTOR="slurm"), timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_sbatch_script_header_and_outside_slurm():
    text = SBATCH.read_text()
    for line in ("#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in text
    assert "--rdzv-backend=c10d" in text and '--rdzv-id="$SLURM_JOB_ID"' in text
    env = clean_env()
    p = subprocess.run(["bash", str(SBATCH), "+scheme=ternary_grad"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "submit this script with sbatch" in p.stderr
    p = subprocess.run(["bash", str(CLUSTER), "nonsense"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "usage:" in p.stderr


@pytest.mark.parametrize("launcher,target,ranks", [
    ("slurm", "SlurmLauncher", 2), ("slurm_gpu", "SlurmLauncher", 8),
    ("local", "LocalLauncher", 2)])
def test_launcher_configs_compose(launcher, target, ranks):
    _need_submitit()
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dqt.config import register_configs
    from dqt.train.run_dir import register_resolvers

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "+scheme=onebit"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    la = cfg.hydra.launcher
    assert la._target_.endswith(target)
    assert la.tasks_per_node == ranks
    if target == "SlurmLauncher":
        assert la.signal_delay_s == 120 and la.max_num_timeout == 3
    # one directory per sweep point, fixed at submission: shared by its ranks and requeues
    from omegaconf import OmegaConf

    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"


def test_missing_submitit_plugin_names_the_extra(tmp_path):
    """Without hydra-submitit-launcher (here: hidden behind an empty hydra_plugins package)."""
    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "__init__.py").write_text("")
    p = subprocess.run([sys.executable, TRAIN, "-m", "hydra/launcher=slurm", "+scheme=onebit"],
                       cwd=tmp_path, env=clean_env(PYTHONPATH=str(tmp_path)),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "hydra/launcher=slurm (conf/hydra/launcher/) needs Hydra's submitit launcher" in p.stderr
    assert "pip install -e '.[slurm]'" in p.stderr


# --------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def slurm():
    """A running local cluster: the one .ci/run started, or one started (and stopped) here."""
    if os.geteuid() != 0:
        _unavailable("the local SLURM cluster needs root (munged runs as user munge, slurmd as "
                     "root)")
    missing = [e for e in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
               if shutil.which(e) is None]
    if missing:
        _unavailable(f"SLURM is not installed (no {', '.join(missing)}): run "
                     "`launch/slurm/local_cluster.sh install` as root (apt-get install slurmctld "
                     "slurmd slurm-client munge)")
    up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True)
    started_here = up.returncode != 0
    if started_here:
        p = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, f"local_cluster.sh start failed:\n{p.stdout}\n{p.stderr}"
    conf = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True,
                          check=True).stdout.strip().split("=", 1)[1]
    env = {"SLURM_CONF": conf}
    yield env
    if started_here:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True,
                       timeout=180)


@pytest.fixture(scope="module")
def two_nodes(slurm):
    """A second cluster, of two nodes (two slurmd on this machine, one CPU each) for multi-node
    jobs; started and stopped (by its recorded pids) here."""
    env = {**os.environ, "DQT_SLURM_DIR": "/tmp/dqt-slurm-2nodes", "DQT_SLURM_NODES": "2",
           "DQT_SLURMCTLD_PORT": "16837", "DQT_SLURMD_PORT": "16838"}
    p = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                       timeout=120)
    try:
        assert p.returncode == 0, f"local_cluster.sh start (2 nodes) failed:\n{p.stderr}"
        yield {"SLURM_CONF": "/tmp/dqt-slurm-2nodes/slurm.conf"}
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True,
                       timeout=180)


class Jobs:
    """sbatch/scontrol/scancel on the test cluster; cancels what it submitted at the end."""

    def __init__(self, conf_env: dict[str, str]) -> None:
        self.env = clean_env(**conf_env, DQT_PYTHON=sys.executable)
        self.submitted: list[str] = []

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=kw.pop("timeout", 60), **kw)
        assert p.returncode == 0, f"{' '.join(cmd)}: {p.stderr}"
        return p

    def sbatch(self, cwd: Path, *args: str, **env: str) -> str:
        p = self.run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **env})
        job = p.stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def info(self, job: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        return dict(re.findall(r"\b(JobState|Restarts|ExitCode|Reason)=(\S+)", out))

    def wait(self, job: str, pred, what: str, timeout: float = 240) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info(job)
            if pred(info):
                return info
            if info.get("JobState") in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                break
            time.sleep(0.5)
        raise AssertionError(f"job {job}: waited {timeout:.0f} s for {what}; now {info}")

    def requeued(self, job: str, restarts: int) -> float:
        """Wait until SLURM has put the job back in the queue for the `restarts`-th time; returns
        the time seen, after the previous attempt ended and before the next one trains. (SLURM
        holds a requeued job for AuthInfo's cred_expire, 10 s on the local cluster; the next
        attempt takes seconds more to start training.)"""
        self.wait(job, lambda i: int(i.get("Restarts", 0)) == restarts
                  and i.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"),
                  f"requeue #{restarts}")
        return time.time()

    def cancel_all(self) -> None:
        for job in self.submitted:
            subprocess.run(["scancel", job], env=self.env, capture_output=True)


@pytest.fixture
def jobs(slurm):
    j = Jobs(slurm)
    yield j
    j.cancel_all()


def _stopped_at(log: str, sig: str = "SIGTERM") -> list[int]:
    return [int(k) for k in re.findall(rf"{sig}: stopped at step (\d+) with a checkpoint", log)]


SBATCH_ARGS = ["--cpus-per-task=2", str(SBATCH)]


@pytest.mark.slow
def test_sbatch_trains_two_ranks_to_completion(jobs, tmp_path):
    """`sbatch launch/slurm/train.sbatch +scheme=ternary_grad`, 2 ranks on the one node."""
    job = jobs.sbatch(tmp_path, *SBATCH_ARGS, "+scheme=ternary_grad", "steps=60", "log_every=10",
                      DQT_NPROC_PER_NODE="2")
    info = jobs.wait(job, lambda i: i.get("JobState") == "COMPLETED", "completion")
    out = (tmp_path / f"slurm-dqt-{job}.out").read_text()
    assert info["ExitCode"] == "0:0", out[-3000:]
    assert f"job {job} attempt 1: 1 node(s) x 2 rank(s)" in out and "srun exited 0" in out

    run_dir = tmp_path / "outputs" / f"slurm-{job}"
    names = {p.name for p in run_dir.iterdir()}
    assert {".hydra", "config.yaml", "metrics.jsonl", "train_rank0.log", "train_rank1.log",
            "checkpoints"} <= names, names
    assert "2 ranks (torchrun, gloo)" in (run_dir / "train_rank0.log").read_text()
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps"] == 60 and s["scheme"] == "ternary_grad"
    assert s["params_in_sync"] is True and s["preempted"] is False
    assert s["comm/ratio"] > 15
    final = checkpoints(run_dir)[-1]
    assert final.name == "step_0000060"
    digests = {torch.load(final / f"rank{r}.pt", weights_only=False)["params_sha256"]
               for r in range(2)}
    assert digests == {s["params_sha256"]}


@pytest.mark.slow
def test_stopped_job_checkpoints_is_requeued_and_resumes(jobs, tmp_path):
    """One job, stopped twice, finishing with the step count it was asked for:

    1. ``scancel --signal=TERM`` (what ``--signal=TERM@120`` sends before the time limit, to the
       job step only): every rank checkpoints and exits 0, the batch script requeues the job;
    2. ``scontrol requeue``: SLURM ends the job (SIGTERM to every process), the ranks
       checkpoint, SLURM puts the job back in the queue.

    Each attempt resumes from the previous one's checkpoint, in the same run directory, with the
    per-rank error-feedback state of onebit restored."""
    steps = 2000
    job = jobs.sbatch(tmp_path, *SBATCH_ARGS, "+scheme=onebit", f"steps={steps}", "log_every=10",
                      "eval_every=0", DQT_NPROC_PER_NODE="2")
    run_dir = tmp_path / "outputs" / f"slurm-{job}"
    log = run_dir / "train_rank0.log"

    wait_for_step(run_dir, 20)
    jobs.run("scancel", "--signal=TERM", job)
    t1 = jobs.requeued(job, restarts=1)
    (k1,) = _stopped_at(log.read_text())
    assert 20 <= k1 < steps

    wait_for_step(run_dir, k1 + 20)
    assert f"resumed from step {k1}" in log.read_text()
    jobs.run("scontrol", "requeue", job)
    t2 = jobs.requeued(job, restarts=2)
    k1_, k2 = _stopped_at(log.read_text())
    assert k1_ == k1 and k1 < k2 < steps

    info = jobs.wait(job, lambda i: i.get("JobState") == "COMPLETED", "completion")
    out = (tmp_path / f"slurm-dqt-{job}.out").read_text()
    assert info["ExitCode"] == "0:0", out[-3000:]
    for n in (1, 2, 3):
        assert f"job {job} attempt {n}:" in out
    assert f"requeueing job {job}" in out  # attempt 1: the script requeued itself
    assert "SLURM is ending this job" in out  # attempt 2: scontrol requeue
    assert f"resumed from step {k2}" in log.read_text()

    s = summary(run_dir)
    assert s["steps"] == steps and s["preempted"] is False and s["params_in_sync"] is True
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(10, steps + 1, 10))
    # resumed, not restarted: each record was written by the attempt that reached that step
    # (attempt 1 ended before t1 and attempt 2 trained after it; likewise t2)
    for r in train:
        attempt = 1 if r["step"] <= k1 else 2 if r["step"] <= k2 else 3
        window = {1: (0, t1), 2: (t1, t2), 3: (t2, float("inf"))}[attempt]
        assert window[0] < r["time"] < window[1], (r["step"], attempt, k1, k2)
    # the checkpoint written on scontrol requeue holds each rank's own error-feedback residuals
    saved = {int(p.name.split("_")[1]): p for p in checkpoints(run_dir)}
    assert sorted(saved) == [k2, steps]
    ranks = [torch.load(saved[k2] / f"rank{r}.pt", weights_only=False)["scheme"] for r in range(2)]
    assert all(st["step"] == k2 for st in ranks)
    assert ranks[0]["worker_residual"].abs().sum() > 0
    assert not torch.equal(ranks[0]["worker_residual"], ranks[1]["worker_residual"])


@pytest.mark.slow
def test_sbatch_two_nodes_rendezvous(two_nodes, tmp_path):
    """`sbatch --nodes=2`: one torchrun per node, c10d rendezvous on the first node's address."""
    jobs = Jobs(two_nodes)
    try:
        job = jobs.sbatch(tmp_path, "--nodes=2", str(SBATCH), "+scheme=ternary_grad", "steps=40",
                          "eval_every=0", DQT_NPROC_PER_NODE="1")
        info = jobs.wait(job, lambda i: i.get("JobState") == "COMPLETED", "completion")
    finally:
        jobs.cancel_all()
    out = (tmp_path / f"slurm-dqt-{job}.out").read_text()
    assert info["ExitCode"] == "0:0", out[-3000:]
    assert re.search(r"2 node\(s\) x 1 rank\(s\), rendezvous 127\.0\.0\.1:\d+ on \S+-n1", out), out
    run_dir = tmp_path / "outputs" / f"slurm-{job}"
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["steps"] == 40 and s["params_in_sync"] is True
    # one rank on each node (which rank where is the rendezvous' choice)
    nodes = {re.search(rf"2 ranks \(torchrun, gloo\) \| rank {r} on (\S+) ",
                       (run_dir / f"train_rank{r}.log").read_text()).group(1) for r in (0, 1)}
    assert {n.rsplit("-", 1)[1] for n in nodes} == {"n1", "n2"}, nodes


@pytest.mark.slow
def test_submitit_sweep_on_two_nodes(two_nodes, tmp_path):
    """hydra.launcher.nodes=2: one rank per node, master = the first node's NodeAddr."""
    _need_submitit()
    sweep = tmp_path / "sweep"
    env = clean_env(**two_nodes)
    proc = _sweep(tmp_path, env, "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                  "hydra.launcher.tasks_per_node=1", "+scheme=onebit", "steps=40",
                  "eval_every=0", f"hydra.sweep.dir={sweep}")
    _finish(proc)
    _check_sweep_point(sweep / "0", "onebit", "slurm")
    for rank in (0, 1):
        log = (sweep / "0" / f"train_rank{rank}.log").read_text()
        assert re.search(rf"\| rank {rank} on \S+-n{rank + 1} ", log), log


def _sweep(cwd: Path, env: dict[str, str], *overrides: str, timeout: int = 420,
           **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN, "-m", *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _finish(proc: subprocess.Popen, timeout: int = 420) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"sweep still running after {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _submitit_dirs(sweep: Path) -> list[Path]:
    """submitit's per-job folders (<job id> or <array id>_<task>) under <sweep>/.submitit."""
    return [p for p in (sweep / ".submitit").iterdir() if p.is_dir()]


def _check_sweep_point(point: Path, scheme: str, launcher: str) -> None:
    s = summary(point)
    assert s["scheme"] == scheme and s["world_size"] == 2 and s["params_in_sync"] is True
    assert f"2 ranks ({launcher}, gloo)" in (point / "train_rank0.log").read_text()
    assert (point / ".hydra" / "overrides.yaml").exists()  # written once, by rank 0
    assert (point / "train_rank1.log").exists()


@pytest.mark.slow
def test_submitit_slurm_sweep_runs_one_job_per_point(jobs, tmp_path):
    """`python launch/train.py -m hydra/launcher=slurm +scheme=onebit,ternary_grad`."""
    _need_submitit()
    sweep = tmp_path / "sweep"
    proc = _sweep(tmp_path, jobs.env, "hydra/launcher=slurm", "+scheme=onebit,ternary_grad",
                  "steps=40", "eval_every=0", f"hydra.sweep.dir={sweep}")
    out = _finish(proc)
    assert "#0 : +scheme=onebit" in out and "#1 : +scheme=ternary_grad" in out
    for num, scheme in enumerate(["onebit", "ternary_grad"]):
        _check_sweep_point(sweep / str(num), scheme, "slurm")
    array = {p.name.split("_")[0] for p in _submitit_dirs(sweep)}
    assert len(array) == 1  # one array job, one task per sweep point
    (job,) = array
    jobs.submitted.append(job)
    assert {p.name for p in _submitit_dirs(sweep)} >= {f"{job}_0", f"{job}_1"}
    for task in ("0", "1"):  # submitit returns on the result files; the job ends just after
        info = jobs.wait(f"{job}_{task}", lambda i: i.get("JobState") == "COMPLETED", "its end",
                         timeout=60)
        assert info["ExitCode"] == "0:0"


@pytest.mark.slow
def test_submitit_preemption_signal_checkpoints_requeues_and_resumes(jobs, tmp_path):
    """submitit's signal (USR2, sent `signal_delay_s` before the time limit; here by scancel):
    the ranks finish their step and checkpoint, then submitit's handler requeues the job, which
    resumes in the same sweep directory (the default, timestamped one)."""
    _need_submitit()
    steps = 2000
    proc = _sweep(tmp_path, jobs.env, "hydra/launcher=slurm", "+scheme=ternary_grad",
                  f"steps={steps}", "log_every=10", "eval_every=0")
    deadline = time.time() + 240
    while not glob.glob(f"{tmp_path}/multirun/*/*/0/metrics.jsonl") and time.time() < deadline:
        time.sleep(0.2)
    (point,) = [Path(p).parent for p in glob.glob(f"{tmp_path}/multirun/*/*/0/metrics.jsonl")]
    wait_for_step(point, 20)
    (job,) = {p.name.split("_")[0] for p in _submitit_dirs(point.parent)}
    jobs.submitted.append(job)
    jobs.run("scancel", "--signal=USR2", job)
    jobs.requeued(job, restarts=1)
    _finish(proc)

    log = (point / "train_rank0.log").read_text()
    (k,) = _stopped_at(log, "SIGUSR2")
    assert 20 <= k < steps and f"resumed from step {k}" in log
    assert "Requeued job" in log  # submitit's handler, after dqt's checkpoint
    s = summary(point)
    assert s["steps"] == steps and s["params_in_sync"] is True
    train = [r["step"] for r in read_metrics(point) if r["kind"] == "train"]
    assert train == list(range(10, steps + 1, 10))
    assert len(glob.glob(f"{tmp_path}/multirun/*/*")) == 1  # one sweep dir across the requeue


@pytest.mark.slow
def test_submitit_local_runs_the_same_sweep_on_this_machine(tmp_path):
    _need_submitit()
    sweep = tmp_path / "sweep"
    proc = _sweep(tmp_path, clean_env(), "hydra/launcher=local", "+scheme=onebit,ternary_grad",
                  "steps=40", "eval_every=0", f"hydra.sweep.dir={sweep}")
    _finish(proc)
    for num, scheme in enumerate(["onebit", "ternary_grad"]):
        _check_sweep_point(sweep / str(num), scheme, "submitit-local")

"""The real CLI end to end: torchrun with 2 gloo ranks, plain ``python``, and an srun-style
launch; one shared run directory, accuracy, bitwise-identical parameters across ranks,
SIGTERM + resume equal to an uninterrupted run, world-size checks, offline W&B, reports."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (REPO, checkpoints, clean_env, read_metrics, run_train, summary,
                      train_cmd, wait_for_step)
from dqt.train.checkpoint import file_sha256
from tests.wandb_log import config_and_history

pytestmark = pytest.mark.slow
# the same training maths in every run below; only bookkeeping knobs differ
BASE = ["steps=300", "log_every=5", "deterministic=true"]


def _sha256(state: dict[str, torch.Tensor]) -> str:
    """Independent of dqt's own digest code: name + raw bytes of every tensor, sorted."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoints(run_dir)[-1] / "train.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """`torchrun --nproc_per_node=2 launch/train.py` from a fresh directory, no run dir given."""
    cwd = tmp_path_factory.mktemp("cwd")
    p = subprocess.run(train_cmd(*BASE, nproc=2), cwd=cwd, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = [Path(d) for d in glob.glob(f"{cwd}/outputs/*/*")]
    assert len(runs) == 1, f"ranks must share one run directory, got {runs}"
    return runs[0]


def test_two_ranks_share_one_run_directory(two_rank_run):
    names = sorted(p.name for p in two_rank_run.iterdir())
    for expected in (".hydra", "config.yaml", "metrics.jsonl", "train_rank0.log",
                     "train_rank1.log", "checkpoints"):
        assert expected in names
    assert not [n for n in names if n.startswith(".tmp")]


def test_digits_mlp_reaches_95_percent(two_rank_run):
    s = summary(two_rank_run)
    assert s["world_size"] == 2 and s["steps"] == 300
    assert s["eval/acc"] >= 0.95, s
    assert s["params_in_sync"] is True


def test_parameters_bitwise_identical_across_ranks(two_rank_run):
    ckpt = checkpoints(two_rank_run)[-1]
    digests = [torch.load(ckpt / f"rank{r}.pt", weights_only=False)["params_sha256"]
               for r in range(2)]
    assert digests[0] == digests[1] == _sha256(_final_model(two_rank_run))


def test_metrics_record_the_step_breakdown_and_bytes(two_rank_run):
    train = [r for r in read_metrics(two_rank_run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 301, 5))
    last = train[-1]
    for key in ("train/loss", "train/acc", "lr", "throughput/samples_per_s", "time/data_ms",
                "time/forward_ms", "time/backward_ms", "time/optim_ms", "time/step_ms"):
        assert key in last
    n_params = sum(v.numel() for v in _final_model(two_rank_run).values())
    # plain fp32 ring all-reduce, 2 ranks: 2(N-1)/N * 4 bytes * params per step
    assert last["comm/bytes_sent"] == last["comm/bytes_raw"] == 4 * n_params
    assert last["comm/ratio"] == 1.0


def test_sigterm_then_resume_equals_uninterrupted(two_rank_run, tmp_path):
    run_dir = tmp_path / "killed"
    args = [*BASE, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(train_cmd(*args, nproc=2), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_step(run_dir, 20, poll=0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM does: every process of the job
    out, _ = proc.communicate(timeout=120)
    saved = checkpoints(run_dir)
    assert len(saved) == 1, out[-3000:]
    k = int(saved[0].name.split("_")[1])
    assert 20 <= k < 300, out[-3000:]
    assert f"SIGTERM: stopped at step {k}" in (run_dir / "train_rank0.log").read_text()

    p = run_train(*args, nproc=2)  # same command, same run dir: resumes
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from step {k}" in (run_dir / "train_rank0.log").read_text()
    resumed, reference = _final_model(run_dir), _final_model(two_rank_run)
    assert _sha256(resumed) == _sha256(reference)
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 300

    # resuming with another world size is refused, naming the knob, before any training
    p = run_train(*args, "steps=320")
    assert p.returncode == 2
    assert "checkpoint.allow_world_size_change" in p.stderr
    assert "written by 2 rank(s) but this run has 1" in p.stderr
    assert int(checkpoints(run_dir)[-1].name.split("_")[1]) == 300
    # ... or allowed explicitly: model and optimizer restored, training goes on
    p = run_train(*args, "steps=320", "checkpoint.allow_world_size_change=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(run_dir)["steps"] == 320


def test_sigterm_to_torchrun_alone_reaches_every_rank(tmp_path):
    """torchrun forwards a SIGTERM it gets to its workers: with torchrun alone signalled, every
    rank still finishes its step and writes its part of the checkpoint (torchrun itself then
    exits 1 with its SignalException; launch/slurm/train.sbatch avoids that, see README)."""
    proc = subprocess.Popen(train_cmd("steps=3000", "log_every=10", "eval_every=0",
                                      f"hydra.run.dir={tmp_path}", nproc=2),
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_step(tmp_path, 20, poll=0.05)
    proc.send_signal(signal.SIGTERM)  # the torchrun agent only, not its workers
    out, _ = proc.communicate(timeout=120)
    (saved,) = checkpoints(tmp_path)
    k = int(saved.name.split("_")[1])
    assert 20 <= k < 3000, out[-3000:]
    assert sorted(p.name for p in saved.iterdir()) == ["meta.json", "rank0.pt", "rank1.pt",
                                                      "train.pt"]
    for r in range(2):
        assert f"SIGTERM: stopped at step {k}" in (tmp_path / f"train_rank{r}.log").read_text()
    s = summary(tmp_path)
    assert s["preempted"] is True and s["params_in_sync"] is True and s["steps"] == k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_style_launch_without_torchrun(tmp_path):
    """Two plain processes with SLURM's variables (what `srun -n 2 python ...` gives)."""
    port = str(_free_port())
    procs = [subprocess.Popen(train_cmd("steps=30", "eval_every=0"), cwd=tmp_path,
                              env=clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2",
                                            SLURM_LOCALID=str(r), SLURM_JOB_ID="4242",
                                            SLURM_JOB_NODELIST="localhost",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    run_dir = tmp_path / "outputs" / "slurm-4242"
    s = summary(run_dir)
    assert s["world_size"] == 2 and s["params_in_sync"] is True
    assert (run_dir / "train_rank1.log").exists()



def test_sweep_under_torchrun_runs_every_job_in_one_directory(tmp_path):
    """``torchrun ... launch/train.py -m``: every rank runs the sweep, so each rank's process
    makes one process group per job. Each job's group gets its own key prefix in torchrun's
    store (a second job used to hang reading the first job's keys), and the ranks agree on the
    sweep directory through the store (``${now:}`` differs between ranks that straddle a
    second)."""
    p = subprocess.run(train_cmd("-m", "+scheme=onebit,ternary_grad,fp16", "steps=20",
                                 "eval_every=0", "log_every=10", nproc=2),
                       cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sweeps = glob.glob(f"{tmp_path}/multirun/*/*")
    assert len(sweeps) == 1, f"ranks must share one sweep directory, got {sweeps}"
    jobs = sorted(Path(sweeps[0]).glob("[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1", "2"]
    schemes = []
    for job in jobs:
        s = summary(job)
        assert s["steps"] == 20 and s["world_size"] == 2 and s["params_in_sync"] is True
        assert (job / "train_rank0.log").exists() and (job / "train_rank1.log").exists()
        assert sorted(p.name for p in checkpoints(job)[-1].glob("rank*.pt")) == \
            ["rank0.pt", "rank1.pt"]
        schemes.append(s["scheme"])
    assert schemes == ["onebit", "ternary_grad", "fp16"]


def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    """``torchrun --max-restarts=1`` with ``DQT_RUN_DIR`` (README: elastic restarts): a worker
    killed mid-run makes torchrun restart both; the new attempt's process group meets in the
    agent store under that attempt's prefix (never the dead attempt's keys), resumes from the
    last checkpoint and finishes."""
    run = tmp_path / "run"
    cmd = train_cmd("steps=1500", "checkpoint.every=50", "eval_every=0", "log_every=10", nproc=2)
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    with open(tmp_path / "out.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(DQT_RUN_DIR=str(run)), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_step(run, 120)
            workers = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                     text=True).stdout.split()
            assert len(workers) == 2, workers
            os.kill(int(workers[-1]), signal.SIGKILL)
            assert p.wait(timeout=240) == 0, (tmp_path / "out.log").read_text()[-3000:]
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    log = (run / "train_rank0.log").read_text()
    resumed = [int(line.rsplit("resumed from step ", 1)[1].split()[0])
               for line in log.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and resumed[0] >= 100 and resumed[0] % 50 == 0, resumed
    s = summary(run)
    assert s["steps"] == 1500 and s["params_in_sync"] is True

def test_failing_rank_is_reported_with_its_rank_and_traceback(tmp_path):
    """``@record`` sits inside Hydra (which would swallow the exception), so torchrun's failure
    summary names the rank that failed and shows its traceback."""
    p = run_train("steps=10", "eval_every=0", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 1 alone cannot restore its state: its file (with a matching digest) lacks a key
    ckpt = checkpoints(tmp_path)[-1]
    state = torch.load(ckpt / "rank1.pt", weights_only=False)
    del state["scheme"]
    torch.save(state, ckpt / "rank1.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["rank1.pt"] = file_sha256(str(ckpt / "rank1.pt"))
    (ckpt / "meta.json").write_text(json.dumps(meta))
    p = run_train("steps=20", "eval_every=0", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 1
    root = p.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root, root
    assert "error_file: <N/A>" not in root and "Traceback (most recent call last)" in root
    assert "KeyError" in root and "'scheme'" in root


def test_wandb_offline_run_holds_config_and_history(tmp_path):
    env = clean_env()
    env.pop("WANDB_MODE")
    p = run_train("logger=wandb", "logger.mode=offline", "steps=40", "log_every=10",
                  f"hydra.run.dir={tmp_path}", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    files = glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    assert len(files) == 1
    config, history = config_and_history(files[0])
    assert config["optim"]["lr"] == 0.1 and config["model"]["name"] == "mlp"
    losses = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert sorted(losses) == [10, 20, 30, 40]
    logged = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path) if r["kind"] == "train"}
    assert losses == pytest.approx(logged)


def test_wandb_online_without_credentials_fails_before_training(tmp_path):
    env = clean_env(HOME=str(tmp_path), WANDB_MODE="online")
    p = run_train("logger=wandb", f"hydra.run.dir={tmp_path}/run", env=env)
    assert p.returncode == 2
    assert "logger.mode: logger.mode=online needs W&B credentials" in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision, tmp_path):
    p = run_train(f"precision={precision}", "steps=60", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(tmp_path)
    assert s["eval/acc"] > 0.85
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert ("precision/loss_scale" in train[-1]) == (precision == "fp16")


def test_grad_accumulation_matches_one_large_batch(tmp_path):
    """2 micro-batches of 32 with no_sync == one batch of 64 (same samples, same order)."""
    runs = {}
    for name, args in {"accum": ["grad_accum=2", "data.batch_size=32"],
                       "large": ["data.batch_size=64"]}.items():
        p = run_train(*args, "steps=20", "log_every=1", f"hydra.run.dir={tmp_path / name}")
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = tmp_path / name
    a, b = _final_model(runs["accum"]), _final_model(runs["large"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # no_sync: the hook runs once per optimizer step, not once per micro-batch
    calls = [[r["comm/collectives"] for r in read_metrics(d) if r["kind"] == "train"]
             for d in runs.values()]
    assert calls[0] == calls[1]


def test_gpt_on_text_runs(tmp_path):
    p = run_train("experiment=gpt_text", "steps=6", "eval_every=0", "model.n_layer=1",
                  "model.n_embd=32", "model.n_head=2", "data.block_size=16",
                  "data.max_chars=20000", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(tmp_path)
    assert 0 < s["eval/loss"] < 6


def test_report_table_and_plots(two_rank_run, tmp_path):
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, str(REPO / "launch/report.py"),
                        str(two_rank_run), "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "| run | model | data | scheme |" in p.stdout
    row = [line for line in p.stdout.splitlines() if two_rank_run.name in line][0]
    assert "| mlp | digits | allreduce | none | 2 | 300 |" in row
    for png in ("loss_vs_step.png", "loss_vs_bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.md").read_text().startswith("| run |")
    bad = subprocess.run([sys.executable, str(REPO / "launch/report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no metrics.jsonl" in bad.stderr


def test_report_plots_bench_link_rows(tmp_path):
    """launch/report.py --link: one step-time chart per model from bench_link's JSON rows."""
    rows = [{"model": m, "rate": rate, "scheme": s, "step_ms": ms, "floor_ms": 100.0}
            for m in ("mlp_20m", "gpt") for rate in ("1gbit", "10gbit")
            for s, ms in (("fp32 all-reduce", 900.0), ("onebit", 250.0))]
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows}))
    p = subprocess.run([sys.executable, str(REPO / "launch/report.py"), "--link",
                        str(tmp_path / "rows.json"), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for m in ("mlp_20m", "gpt"):
        assert (tmp_path / "r" / f"step_time_{m}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, str(REPO / "launch/report.py"), "--link",
                          str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.json" in bad.stderr


def test_compressed_resume_restores_error_feedback_exactly(tmp_path):
    """20 steps + resume to 40 == 40 steps: parameters and per-rank residuals, bitwise."""
    common = ["+scheme=onebit", "scheme.block_size=256", "optim.schedule=constant",
              "eval_every=0", "deterministic=true"]
    for args in ([*common, "steps=40", f"hydra.run.dir={tmp_path}/full"],
                 [*common, "steps=20", f"hydra.run.dir={tmp_path}/split"],
                 [*common, "steps=40", f"hydra.run.dir={tmp_path}/split"]):
        p = run_train(*args, nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
    full, split = tmp_path / "full", tmp_path / "split"
    assert "resumed from step 20" in (split / "train_rank0.log").read_text()
    assert _sha256(_final_model(full)) == _sha256(_final_model(split))
    for r in range(2):
        a, b = (torch.load(checkpoints(d)[-1] / f"rank{r}.pt", weights_only=False)["scheme"]
                for d in (full, split))
        assert a["step"] == b["step"] == 40
        for key in ("worker_residual", "server_residual"):
            assert a[key].abs().sum() > 0
            assert torch.equal(a[key], b[key]), f"rank {r} {key} not restored exactly"


def test_the_first_line_users_type(tmp_path):
    """`torchrun --nproc_per_node=2 launch/train.py +scheme=ternary_grad` on the default data."""
    p = run_train("+scheme=ternary_grad", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(tmp_path)
    assert s["eval/acc"] >= 0.95 and s["params_in_sync"] is True
    assert s["comm/ratio"] > 15  # 2-bit codes + one fp32 scale per 2048 values
    done = [line for line in (tmp_path / "train_rank0.log").read_text().splitlines()
            if "done:" in line][-1]
    assert "eval/acc" in done and "saved" in done


def test_report_labels_tell_runs_apart():
    """Study layouts end in seedN: the table and plot labels keep the shortest suffix length that tells them apart."""
    from dqt.train.report import Run, labels

    runs = [Run(p, {}, []) for p in ("/s/mlp/fp32/onebit/seed1", "/s/mlp/fp32/bf16/seed1",
                                     "/s/mlp/w8a8/onebit/seed1")]
    assert labels(runs) == ["fp32/onebit/seed1", "fp32/bf16/seed1", "w8a8/onebit/seed1"]
    assert labels(runs[:2]) == ["onebit/seed1", "bf16/seed1"]
    assert labels([Run("/a/run1", {}, [])]) == ["run1"]

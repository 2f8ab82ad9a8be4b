"""backend=horovod for real: 2 processes under ``horovodrun --gloo`` running the real CLI, against
the torch.distributed (gloo) path on the same seeds and data.

Per scheme family — plain (``allreduce``, ``fp16``), sign with error feedback (``onebit``),
majority vote (``signsgd``), ternary with stochastic rounding (``ternary_grad``), k-bit
stochastic rounding (``qsgd``) — the final parameters are bitwise identical on the two ranks
*and* bitwise equal to the torch.distributed run's, with the same bytes counted. The model is an
MLP of 0.6 M parameters, so after DDP's first-step rebuild the gradients travel in two buckets
(1 MiB first bucket), and ``scheme.warmup_steps=2`` runs the plain path before compressing.
A resumed Horovod run equals an uninterrupted one (per-rank error feedback in the checkpoint).

Horovod is optional (``make horovod``); without it these tests skip, unless
``DQT_REQUIRE_HOROVOD=1`` (set by ``.ci/run``, which builds it) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TRAIN, checkpoints, clean_env, read_metrics, run_train, summary

COMPRESSED_SCHEMES = ["onebit", "signsgd", "ternary_grad", "qsgd"]
SCHEMES = ["allreduce", "fp16", *COMPRESSED_SCHEMES]
COMMON = ["model.widths=[1024,512]", "steps=12", "eval_every=0", "log_every=4",
          "optim.schedule=constant", "deterministic=true"]
COMPRESSED = ["++scheme.warmup_steps=2"]  # ++: applied whatever order the sweep puts it in


def _unavailable() -> str | None:
    if importlib.util.find_spec("horovod") is None:
        return "Horovod is not installed (make horovod)"
    if shutil.which("horovodrun", path=os.path.dirname(sys.executable)) is None:
        return "horovodrun is not next to this Python"
    return None


REASON = _unavailable()
if REASON and os.environ.get("DQT_REQUIRE_HOROVOD") == "1":
    pytest.fail(f"DQT_REQUIRE_HOROVOD=1 but {REASON}", pytrace=False)
pytestmark = [pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.timeout(1800)]  # the module fixture launches 10 jobs


def horovodrun(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", "2", "-H",
           "localhost:2", "--gloo", sys.executable, TRAIN, *overrides, "backend=horovod"]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> None:
    if p.returncode != 0:
        lines = (p.stdout + p.stderr).splitlines()
        hints = [ln for ln in lines if any(w in ln for w in ("rror", "terminate", "Exit code",
                                                               "done:", "Launching", "#"))]
        raise AssertionError(f"exit {p.returncode}:\n" + "\n".join(hints[-40:]))


def _jobs(sweep: Path) -> dict[str, dict]:
    """scheme name → summary of each job of a multirun sweep."""
    out = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        s = summary(job)
        out[s["scheme"]] = s
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Under horovodrun and under torchrun: one sweep (``-m``) over dqt's schemes (four jobs,
    four process groups in each rank's process), then fp16 and plain all-reduce (no
    ``+scheme``)."""
    tmp = tmp_path_factory.mktemp("hvd")
    out: dict[str, dict] = {"horovod": {}, "torch": {}}
    sweep = ["-m", f"+scheme={','.join(COMPRESSED_SCHEMES)}", *COMMON, *COMPRESSED]
    _ok(horovodrun(*sweep, f"hydra.sweep.dir={tmp}/horovod"))
    out["horovod"] = _jobs(tmp / "horovod")
    _ok(_torchrun(*sweep, f"hydra.sweep.dir={tmp}/torch"))
    out["torch"] = _jobs(tmp / "torch")
    for name, launch in (("horovod", horovodrun), ("torch", _torchrun)):
        for extra in ([], ["+scheme=fp16"]):
            run_dir = tmp / f"{name}_{'fp16' if extra else 'allreduce'}"
            _ok(launch(*extra, *COMMON, f"hydra.run.dir={run_dir}"))
            out[name][summary(run_dir)["scheme"]] = summary(run_dir)
    out["dirs"] = {"hvd_allreduce": tmp / "horovod_allreduce"}
    return out


def _torchrun(*overrides: str) -> subprocess.CompletedProcess:
    return run_train(*overrides, nproc=2, timeout=300)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_horovod_equals_torch_distributed_bitwise(runs, scheme):
    hvd, ref = runs["horovod"][scheme], runs["torch"][scheme]
    assert hvd["steps"] == ref["steps"] == 12 and hvd["world_size"] == 2
    assert hvd["params_in_sync"] is True, "ranks differ under Horovod"
    assert hvd["params_sha256"] == ref["params_sha256"], \
        f"{scheme}: Horovod and torch.distributed trained different parameters"
    assert hvd["comm/bytes_sent_total"] == ref["comm/bytes_sent_total"] > 0
    assert hvd["comm/bytes_raw_total"] == ref["comm/bytes_raw_total"]


def test_horovod_run_learns_and_logs(runs):
    rows = read_metrics(runs["dirs"]["hvd_allreduce"])
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12]
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    log = (runs["dirs"]["hvd_allreduce"] / "train_rank0.log").read_text()
    assert "2 ranks (horovodrun, horovod)" in log


@pytest.mark.parametrize("buckets", [[], ["model.widths=[64,64,64]", "backend.bucket_cap_mb=0.01"]],
                         ids=["one_bucket", "three_buckets"])
def test_horovod_resume_restores_error_feedback_exactly(buckets, tmp_path):
    """Under Horovod, 6 steps then a resume to 12 == 12 uninterrupted steps: parameters and
    per-rank residuals, bitwise, with the default MLP's one bucket and with three (the resumed
    process's first step, one bucket, follows the checkpoint's bucket compositions)."""
    common = ["+scheme=onebit", "steps=12", "eval_every=0", "optim.schedule=constant",
              "deterministic=true", *buckets]
    _ok(horovodrun(*common, f"hydra.run.dir={tmp_path}/full"))
    _ok(horovodrun(*[a.replace("steps=12", "steps=6") for a in common],
                   f"hydra.run.dir={tmp_path}/split"))
    _ok(horovodrun(*common, f"hydra.run.dir={tmp_path}/split"))
    full, split = tmp_path / "full", tmp_path / "split"
    assert "resumed from step 6" in (split / "train_rank0.log").read_text()
    assert summary(split)["params_sha256"] == summary(full)["params_sha256"]
    for r in range(2):
        a, b = (torch.load(checkpoints(d)[-1] / f"rank{r}.pt", weights_only=False)["scheme"]
                for d in (full, split))
        assert a["step"] == b["step"] == 12
        assert (len(a["buckets"]) >= 3) == bool(buckets), a["buckets"]
        assert a["buckets"] == b["buckets"]
        for key in ("worker_residual", "server_residual"):
            assert a[key].abs().sum() > 0
            assert torch.equal(a[key], b[key]), f"rank {r} {key} not restored exactly"


@pytest.mark.parametrize("override,key", [("+scheme=bf16", "scheme.name"),
                                          ("+scheme=powersgd", "scheme.name"),
                                          ("+scheme=onebit scheme.auto=true", "scheme.auto")])
def test_unsupported_under_horovod_fails_before_training(override, key, tmp_path):
    p = run_train("backend=horovod", *override.split(), f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    assert f"config error: {key}" in p.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_horovod_backend_under_torchrun_is_refused(tmp_path):
    p = run_train("backend=horovod", "steps=2", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode != 0
    assert "launch with horovodrun" in p.stderr + p.stdout

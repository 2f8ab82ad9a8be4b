"""dqt's compression inside real PyTorch Lightning (2 CPU processes, Lightning's own DDP
launcher): ranks end bitwise identical with the scheme's bytes counted, every rank's error
feedback goes into Lightning's checkpoint and a resumed fit equals an uninterrupted one
bitwise, under fp16 AMP the loss scale reaches the codec, and a strategy that is not DDP is
refused with one message."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, clean_env

pytest.importorskip("lightning")
JOB = REPO / "tests" / "lightning_job.py"


def _fit(tmp_path, out: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(JOB), str(tmp_path / out), *args], cwd=tmp_path,
                       env=clean_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _ranks(tmp_path, out: str) -> list[dict]:
    return [torch.load(tmp_path / out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["onebit", "ternary_grad"])
def test_a_resumed_fit_equals_an_uninterrupted_one(codec, tmp_path):
    _fit(tmp_path, "full", "--steps", "20", "--save-every", "10", "--codec", codec)
    ckpt = tmp_path / "full" / "ckpt" / "step=10.ckpt"
    _fit(tmp_path, "resumed", "--steps", "20", "--resume", str(ckpt), "--codec", codec)
    full, resumed = _ranks(tmp_path, "full"), _ranks(tmp_path, "resumed")
    for r in range(2):
        assert all(torch.equal(a, b) for a, b in zip(full[r]["params"], resumed[r]["params"])), r
        assert all(torch.equal(a, b) for a, b in zip(full[r]["params"], full[0]["params"])), r
    # bytes: 5 fp32 warm-up steps, then the codec (the resumed fit ran steps 10..19 only)
    n = sum(p.numel() for p in full[0]["params"])
    assert full[0]["bytes_raw"] == 20 * 4 * n
    per_step = resumed[0]["bytes_sent"] / 10
    assert full[0]["bytes_sent"] == 5 * 4 * n + 15 * per_step
    assert per_step * 7 < 4 * n  # compressed
    saved = torch.load(ckpt, weights_only=False)["dqt_compression"]
    assert len(saved) == 2 and saved[0]["step"] == saved[1]["step"] == 10
    if codec == "onebit":  # the error feedback of each rank, saved separately
        w0, w1 = (s["worker_residual"] for s in saved)
        assert w0.abs().sum() > 0 and not torch.equal(w0, w1)


@pytest.mark.slow
def test_a_strategy_that_is_not_ddp_is_refused(tmp_path):
    p = _fit(tmp_path, "single", "--steps", "2", "--devices", "1", "--strategy", "auto",
             check=False)
    assert p.returncode != 0
    assert "DQTCompression compresses DDP's all-reduce: use strategy='ddp'" in p.stderr


@pytest.mark.slow
def test_fp16_loss_scale_reaches_the_codec(tmp_path):
    """Under Lightning's fp16 AMP (``MixedPrecision`` with a CPU ``GradScaler``) the callback
    passes the loss scale to the scheme before every backward: with a scale of 1024 the error
    feedback (kept in unscaled units) ends as with a scale of 1 — the two differ only by fp16
    rounding. Without the scale the 1024-scaled run's residuals were 3.8× larger (its
    preconditioned values clamped at the unscaled bound)."""
    _fit(tmp_path, "s1024", "--steps", "12", "--fp16-scale", "1024")
    _fit(tmp_path, "s1", "--steps", "12", "--fp16-scale", "1")
    for r in range(2):
        a, b = (_ranks(tmp_path, d)[r]["scheme"]["worker_residual"] for d in ("s1024", "s1"))
        assert a.norm() > 0
        assert abs(float(a.norm() / b.norm()) - 1) < 0.05, (float(a.norm()), float(b.norm()))

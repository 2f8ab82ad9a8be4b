"""A full disk, through the real CLI on 2 ranks with the run directory on a 3 MB tmpfs: the
checkpoint that does not fit stops every rank with one line naming the file, the space needed
and free, and the newest complete checkpoint, which stays intact and is resumed; what an
interrupted write leaves (``checkpoints/.tmp-step_*``, ``*.partial``) is removed at start-up
before anything is written. Needs root to mount the tmpfs (skipped otherwise)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.conftest import run_train

MB3 = ["model.widths=[400,400]", "eval_every=0", "checkpoint.every=2"]  # ~1.5 MB a checkpoint


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(small_disk):
    run = small_disk / "run"
    p = run_train(*MB3, "steps=20", f"hydra.run.dir={run}", nproc=2)
    assert p.returncode != 0
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("dqt: ")]
    assert line and "no space left on device writing " \
        f"{run}/checkpoints/.tmp-step_0000004/rank" in line[0], p.stderr[-2000:]
    assert "(checkpoint step 4 needs ~1." in line[0]
    assert line[0].endswith("the newest complete checkpoint (step 2) is intact")
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000002"]
    meta = json.loads((run / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["step"] == 2
    torch.load(run / "checkpoints" / "step_0000002" / "train.pt", weights_only=False)
    # an interrupted write's leftovers go at start-up, before anything is written
    (run / "checkpoints" / ".tmp-step_0000009").mkdir()
    (run / "checkpoints" / ".tmp-step_0000009" / "rank0.pt.partial").write_bytes(b"x" * 1000)
    (run / "config.yaml.partial").write_text("torn")
    p = run_train(*MB3, "steps=2", f"hydra.run.dir={run}", nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (run / "train_rank0.log").read_text()
    assert f"removed {run}/config.yaml.partial, left by an interrupted write" in log
    assert f"removed {run}/checkpoints/.tmp-step_0000009" in log
    assert "resumed from step 2" in log
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000002"]
    assert not (run / "config.yaml.partial").exists()

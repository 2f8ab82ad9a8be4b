"""A damaged checkpoint never blocks a resume: through the real CLI on 2 ranks, a truncated
``train.pt`` or ``rank1.pt`` in the newest checkpoint is named in a warning and skipped, the
newest undamaged one is resumed, and the run ends bitwise where an uninterrupted one does. A
step directory without its ``meta.json`` does not count toward ``checkpoint.keep``."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_train

COMMON = ["+scheme=onebit", "eval_every=0", "checkpoint.every=2", "checkpoint.keep=3",
          "optim.schedule=constant"]


def _final_model(run_dir):
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return torch.load(last / "train.pt", weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["train.pt", "rank1.pt"])
def test_a_damaged_checkpoint_is_skipped_with_a_warning(damaged, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    for args in (["steps=8", f"hydra.run.dir={full}"], ["steps=6", f"hydra.run.dir={split}"]):
        p = run_train(*COMMON, *args, nproc=2)
        assert p.returncode == 0, p.stderr[-2000:]
    newest = split / "checkpoints" / "step_0000006"
    meta = json.loads((newest / "meta.json").read_text())
    assert set(meta["sha256"]) == {"train.pt", "rank0.pt", "rank1.pt"}
    f = newest / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a write cut short
    p = run_train(*COMMON, "steps=8", f"hydra.run.dir={split}", nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (split / "train_rank0.log").read_text()
    assert (f"checkpoint {newest} is damaged ({damaged} does not match the sha256 recorded "
            "when it was written); skipped, trying an older one") in log
    assert "resumed from step 4" in log
    a, b = _final_model(full), _final_model(split)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run must end where the full one does"


@pytest.mark.slow
def test_a_step_directory_without_meta_does_not_count_toward_keep(tmp_path):
    p = run_train(*COMMON, "steps=4", "checkpoint.keep=1", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    root = tmp_path / "checkpoints"
    stray = root / "step_0000099"  # a later step with no meta.json: incomplete
    stray.mkdir()
    p = run_train(*COMMON, "steps=6", "checkpoint.keep=1", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from step 4" in (tmp_path / "train_rank0.log").read_text()
    assert sorted(d.name for d in root.iterdir()) == ["step_0000006", "step_0000099"]


@pytest.mark.slow
def test_when_every_checkpoint_is_damaged_the_run_is_not_started_over_silently(tmp_path):
    p = run_train(*COMMON, "steps=2", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    only = tmp_path / "checkpoints" / "step_0000002"
    (only / "rank1.pt").unlink()
    p = run_train(*COMMON, "steps=4", f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode != 0
    assert ("dqt: config error: checkpoint.resume: every checkpoint of this run directory is "
            f"damaged: {only} (rank1.pt is missing)") in p.stderr, p.stderr[-2000:]
    p = run_train(*COMMON, "steps=4", "checkpoint.resume=false", f"hydra.run.dir={tmp_path}",
                  nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]

"""Ranks that do not share the run directory (nodes without a shared filesystem) are stopped at
start-up with one message naming ``hydra.run.dir`` and the blind ranks — simulated through the
real CLI with a run directory per rank (``${dqt_rank:}``) — before any checkpoint is written."""

from __future__ import annotations

from tests.conftest import run_train


def test_an_unshared_run_directory_is_refused_at_start_up(tmp_path):
    p = run_train("steps=3", "eval_every=0", f"hydra.run.dir={tmp_path}/" + "${dqt_rank:}",
                  nproc=2)
    assert p.returncode != 0
    assert (f"dqt: config error: hydra.run.dir: {tmp_path}/0 is not shared by every rank: "
            "rank(s) 1 cannot see a file rank 0 wrote there") in p.stderr, p.stderr[-2000:]
    for r in (0, 1):
        assert not (tmp_path / str(r) / "checkpoints").exists()
        assert not list((tmp_path / str(r)).glob(".dqt-shared-*"))

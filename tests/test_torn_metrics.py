"""A torn line in ``metrics.jsonl`` (a write cut by a kill or a full disk) never blocks a resume:
the line is dropped with a warning naming the file and line, and the run goes on."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, run_train


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    common = ["steps=6", "checkpoint.every=3", "eval_every=0", "log_every=1",
              f"hydra.run.dir={tmp_path}"]
    p = run_train(*common, nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + '{"step": 5, "kind": "tra' + "\n" + "\x00\xff garbage")
    p = run_train(*common[1:], "steps=9", nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    logged = (tmp_path / "train_rank0.log").read_text()
    assert f"[WARNING] {path}:5: not a complete metrics record (a write torn by a stop); " \
        "dropped" in logged
    assert f"[WARNING] {path}:6: not a complete metrics record" in logged
    records = read_metrics(tmp_path)  # every line parses again
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 9 and records[-1]["kind"] == "summary"
    assert all(json.dumps(r) for r in records)

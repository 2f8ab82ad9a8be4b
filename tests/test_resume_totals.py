"""Running totals continue across a resume: ``comm/bytes_sent_total`` / ``bytes_raw_total`` in
every record and in the summary, and the summary's ``wall_s``, count every attempt since step 0
(``attempt/*`` holds the last attempt's own), through the real CLI on 2 ranks."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_train


def _totals(run_dir):
    records = read_metrics(run_dir)
    train = {r["step"]: (r["comm/bytes_sent_total"], r["comm/bytes_raw_total"])
             for r in records if r["kind"] == "train"}
    return train, [r for r in records if r["kind"] == "summary"][-1]


@pytest.mark.slow
def test_running_totals_continue_across_a_resume(tmp_path):
    common = ["+scheme=onebit", "scheme.warmup_steps=2", "eval_every=0", "log_every=1",
              "checkpoint.every=2"]
    for args in (["steps=8", f"hydra.run.dir={tmp_path}/full"],
                 ["steps=5", f"hydra.run.dir={tmp_path}/split"],
                 ["steps=8", f"hydra.run.dir={tmp_path}/split"]):
        p = run_train(*common, *args, nproc=2)
        assert p.returncode == 0, p.stderr[-2000:]
    full, full_summary = _totals(tmp_path / "full")
    split, split_summary = _totals(tmp_path / "split")
    assert sorted(full) == sorted(split) == list(range(1, 9))
    assert full[8][0] > full[1][0] > 0
    for step in range(1, 9):
        assert split[step] == full[step], f"step {step}: totals restarted after the resume"
    for key in ("comm/bytes_sent_total", "comm/bytes_raw_total", "comm/bytes_sent_per_step"):
        assert split_summary[key] == full_summary[key], key
    assert split_summary["attempt/first_step"] == 5 and full_summary["attempt/first_step"] == 0
    assert split_summary["wall_s"] > split_summary["attempt/wall_s"] > 0

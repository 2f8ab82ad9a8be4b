"""benchmarks/bench_link.py's repeats: one row per scheme with the median over the runs, every
run's step time kept, the spread printed, and speed-ups taken between medians."""

from __future__ import annotations

from benchmarks.bench_link import merge_repeats, table


def _run(scheme: str, ms: float, compress: float | None = None) -> dict:
    prof = {"forward": 10.0} | ({"compress": compress} if compress is not None else {})
    return {"model": "mlp_20m", "rate": "1gbit", "scheme": scheme, "step_ms": ms,
            "bytes_step": 100, "hook_total": 1000, "iface_total": None, "model_bytes": 4,
            "acc": 0.5, "loss": 1.0, "in_sync": True, "wall_s": 1.0, "profile": prof}


def test_repeats_merge_to_median_and_spread():
    runs = [_run("bf16 (torch hook)", ms) for ms in (600.0, 560.0, 1200.0)]
    runs += [_run("onebit", ms, c) for ms, c in ((300.0, 70.0), (410.0, 90.0), (280.0, 60.0))]
    runs[4]["in_sync"] = False
    rows = merge_repeats(runs)
    assert [r["scheme"] for r in rows] == ["bf16 (torch hook)", "onebit"]
    bf16, onebit = rows
    assert bf16["step_ms"] == 600.0 and bf16["step_ms_runs"] == [600.0, 560.0, 1200.0]
    assert onebit["step_ms"] == 300.0 and onebit["profile"] == {"forward": 10.0, "compress": 70.0}
    assert onebit["in_sync"] is False  # one repeat out of sync marks the row
    text = table(rows, {"mlp_20m": 100.0})
    assert "| bf16 (torch hook) | 600 | 560–1200 (3) |" in text
    assert "| onebit | 300 | 280–410 (3) | — | 2.00x | 3.00x |" in text  # 600 / 300, 300 / 100


def test_one_run_has_no_spread():
    rows = merge_repeats([_run("onebit", 250.0)])
    assert rows[0]["step_ms_runs"] == [250.0]
    assert "| onebit | 250 | — |" in table(rows, {"mlp_20m": 125.0})

"""benchmarks/linklab.py and benchmarks/bench_link.py on real network namespaces (root only): the links
carry at most the shaped rate, ranks train over them, and nothing is left behind — also when the
code inside the lab raises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, clean_env, summary

from benchmarks.linklab import LinkLab, check_root, leftover_namespaces

if check_root() is not None and os.environ.get("DQT_REQUIRE_NETNS") == "1":
    raise RuntimeError(f"DQT_REQUIRE_NETNS=1 (set by .ci/run as root) but: {check_root()}")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(check_root() is not None, reason=str(check_root()))]

RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 29999)); s.listen(1); c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 16)
    if not b: break
    t0 = t0 or time.time(); n += len(b)
print(n, time.time() - t0)
"""
SENDER = """
import socket, sys, time
for _ in range(100):
    try:
        s = socket.create_connection((sys.argv[1], 29999)); break
    except OSError: time.sleep(0.05)
s.sendall(b"x" * int(sys.argv[2])); s.close()
"""


def _transfer(lab: LinkLab, nbytes: int) -> float:
    """Seconds to move nbytes from rank 1 to rank 0 over TCP, as the receiver measures it."""
    rx = subprocess.Popen(["ip", "netns", "exec", lab.namespaces[0], sys.executable, "-c",
                           RECEIVER], stdout=subprocess.PIPE, text=True)
    subprocess.run(["ip", "netns", "exec", lab.namespaces[1], sys.executable, "-c", SENDER,
                    lab.addr(0), str(nbytes)], check=True, timeout=60)
    got, seconds = rx.communicate(timeout=60)[0].split()
    assert int(got) == nbytes
    return float(seconds)


def test_shaped_link_limits_bandwidth_and_is_torn_down():
    with LinkLab(2) as lab:
        assert set(lab.namespaces) <= set(leftover_namespaces())
        fast = _transfer(lab, 4_000_000)
        lab.shape("100mbit")
        assert all("tbf" in q and "100Mbit" in q for q in lab.qdiscs())
        slow = _transfer(lab, 4_000_000)
        # 4 MB at 100 Mbit/s takes 0.32 s; the 256 KB bucket lets 5% through at once
        assert slow >= 0.9 * 4_000_000 * 8 / 100e6, slow
        assert slow > 3 * fast, (slow, fast)
        lab.shape(None)
        assert not any("tbf" in q for q in lab.qdiscs())
    assert leftover_namespaces() == []


def test_teardown_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with LinkLab(3) as lab:
            lab.shape("1gbit")
            raise RuntimeError("boom")
    assert leftover_namespaces() == []


def test_bench_link_trains_over_the_link(tmp_path):
    """Two ranks of the real trainer in two namespaces over a 1 Gbit/s link: they finish in
    sync, and rank 0's interface carried at least the bytes the hook counted."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_link", "--models", "mlp_20m",
         "--schemes", "fp32 all-reduce", "ternary_grad", "--steps", "4", "--warmup", "1",
         "--extra", "model.widths=[256,256]", "--out", str(out), "--json",
         str(tmp_path / "rows.json")],
        env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["fp32 all-reduce", "ternary_grad"]
    for r in rows:
        assert r["in_sync"] and r["rate"] == "1gbit"
        assert r["iface_total"] - r["model_bytes"] >= r["hook_total"] > 0
    assert rows[1]["bytes_step"] < rows[0]["bytes_step"] / 10
    assert summary(out / "mlp_20m" / "1gbit" / "ternary_grad")["steps"] == 4
    assert "| ternary_grad |" in proc.stdout and "Where the step goes" in proc.stdout
    assert {"forward", "compress", "wire", "decompress"} <= set(rows[1]["profile"])
    assert "compress" not in rows[0]["profile"]  # the fp32 all-reduce has no compressor
    assert leftover_namespaces() == []


def test_study_reports_time_to_target(tmp_path):
    """benchmarks/study.py end to end on loopback torchrun (no namespaces needed, but it runs with
    the other link tests): per-run JSON with the steps and bytes to the target, and the table."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.study", "--no-link", "--models", "mlp",
         "--schemes", "allreduce", "ternary_grad", "--qat", "fp32", "--seeds", "1",
         "--extra", "steps=50", "eval_every=25", "--out", str(tmp_path / "study"),
         "--json", str(tmp_path / "study.json")],
        env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["scheme"]: r["runs"][0] for r in json.loads((tmp_path / "study.json").read_text())}
    assert set(rows) == {"allreduce", "ternary_grad"}
    for r in rows.values():
        assert 0 < r["final"] <= 1 and r["bytes_per_step"] > 0
        if r["steps"] is not None:  # reached 0.95 at an eval step: bytes are those sent so far
            assert r["steps"] in (25, 50) and r["bytes"] == r["steps"] * r["bytes_per_step"]
    assert rows["ternary_grad"]["bytes_per_step"] < rows["allreduce"]["bytes_per_step"] / 10
    assert "| ternary_grad | fp32 |" in proc.stdout

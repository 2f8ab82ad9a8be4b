"""A frozen peer (SIGSTOP) does not hang the job: through the real CLI under torchrun, the other
rank's collective fails after ``backend.timeout_s`` (the scheme's own process group included),
the rank prints one line naming itself, the step and the silent rank (its heartbeat stopped),
torchrun stops the job, and no process is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env, train_cmd

TIMEOUT_S = 10


def _pids_of(run_dir: Path) -> dict[int, dict[str, str]]:
    """The processes whose command line names ``run_dir``: pid → their environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if str(run_dir) not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        found[int(entry.name)] = dict(kv.decode(errors="replace").split("=", 1)
                                      for kv in env if b"=" in kv)
    return found


def _wait_for(predicate, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [[], ["+scheme=onebit"]], ids=["allreduce", "onebit"])
def test_a_frozen_peer_is_named_within_the_timeout(scheme, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(*scheme, "steps=1000000", "eval_every=0", "log_every=1",
                    "checkpoint.every=0", f"backend.timeout_s={TIMEOUT_S}",
                    f"hydra.run.dir={run_dir}", nproc=2)
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: [lines.append((time.monotonic(), line))
                                              for line in proc.stderr], daemon=True)
    reader.start()
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 5, 180,
                  "5 logged steps")
        rank1 = [pid for pid, env in _pids_of(run_dir).items() if env.get("RANK") == "1"]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=TIMEOUT_S + 120)
        ended = time.monotonic()
        reader.join(timeout=10)
    finally:
        for pid in _pids_of(run_dir):  # leave nothing behind, whatever happened
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    report = [(t, line) for t, line in lines if line.startswith("dqt: rank 0: a collective")]
    assert report, "".join(line for _, line in lines)[-3000:]
    seen, line = report[0]
    assert "timed out at step" in line and "rank(s) 1 stopped answering" in line, line
    assert f"backend.timeout_s={TIMEOUT_S} s" in line
    assert seen - stopped < TIMEOUT_S + 30, f"{seen - stopped:.1f} s from SIGSTOP to the error"
    assert proc.returncode != 0
    print(f"\n{scheme or 'allreduce'}: error {seen - stopped:.1f} s after SIGSTOP, torchrun "
          f"exited {ended - stopped:.1f} s after: {line.strip()}")
    _wait_for(lambda: not _pids_of(run_dir), 10, "no process left behind")

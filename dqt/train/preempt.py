"""Preemption: a stop request from a signal, agreed on by all ranks at a step boundary.

Who sends what:

- SLURM ends a job with SIGTERM to every process of it (``scancel``, ``scontrol requeue``,
  preemption), and ``#SBATCH --signal=TERM@120`` sends SIGTERM to the job's steps 120 s before
  the time limit; torchrun's agent forwards a SIGTERM it handles to its workers;
- submitit sends its own signal (``$SUBMITIT_PREEMPT_SIGNAL``, USR2 by default) to a job it
  submitted, before the time limit; dqt listens for it inside submitit jobs only.

The handler only records the request. The trainer all-reduces it at the end of every step (max
over ranks), so all ranks stop after the same step and write their part of the checkpoint.
Then :func:`handoff` calls the handler that was installed before dqt's, if it was a Python
function: submitit's, which requeues the job. Run in the middle of a step, that handler would
exit before the checkpoint (submitit's default), so dqt defers it to here.
"""

from __future__ import annotations

import os
import signal
from typing import Any

_previous: dict[int, Any] = {}  # signal -> the handler dqt replaced
_received: int | None = None  # the first stop signal this process got


def stop_signals() -> list[signal.Signals]:
    sigs = [signal.SIGTERM]
    if os.environ.get("SUBMITIT_EXECUTOR"):  # inside a job submitted by submitit
        sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if sig is not None and sig not in sigs:
            sigs.append(sig)
    return sigs


def install() -> None:
    """Record stop signals from now on. Idempotent; a no-op outside the main thread."""
    for sig in stop_signals():
        if sig in _previous:
            continue
        try:
            _previous[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread (e.g. a test harness)
            return


def _handler(signum: int, frame: Any) -> None:
    global _received
    if _received is None:
        _received = signum


def requested() -> bool:
    return _received is not None


def received_name() -> str | None:
    return None if _received is None else signal.Signals(_received).name


def handoff() -> None:
    """After the checkpoint: run the handler dqt replaced for the signal that stopped us.
    Submitit's requeues the job and exits (rank 0); SIG_DFL/SIG_IGN are not called."""
    previous = _previous.get(_received) if _received is not None else None
    if callable(previous):
        previous(_received, None)

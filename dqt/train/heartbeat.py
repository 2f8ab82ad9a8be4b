"""Which rank stopped answering: a heartbeat per rank in the job's key-value store.

Every rank runs a daemon thread that bumps a counter under ``dqt/heartbeat/<rank>`` in the
default process group's store (torchrun's agent store, or the TCP store of a SLURM or Horovod
job) every ``interval`` seconds. A rank blocked in a collective keeps beating; a rank that is
frozen (SIGSTOP, a hung driver) or gone does not. When a collective fails, the trainer reads
every counter twice, a few intervals apart: the ranks whose counter did not move are the ones
that stopped answering. Counters, not clocks, so clock skew between nodes does not matter.
"""

from __future__ import annotations

import threading
import time
from typing import Any

PREFIX = "dqt/heartbeat/"
COMM_FAILURE = ("timed out", "timeout", "connection reset", "connection closed",
                "connection refused", "broken pipe", "exchange failed")
"""Substrings (lower case) of the errors gloo, NCCL and dqt's communication thread raise when a
peer does not answer."""


def comm_failure(e: BaseException) -> bool:
    """Is ``e`` a collective that failed because a peer did not answer?"""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in COMM_FAILURE)


class Heartbeat:
    """This rank's heartbeat thread and the reading of every rank's."""

    def __init__(self, store: Any, rank: int, world: int, interval: float = 1.0) -> None:
        self.store, self.rank, self.world, self.interval = store, rank, world, interval
        self._stop = threading.Event()
        self._beats = 0
        self._thread = threading.Thread(target=self._run, name="dqt-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(f"{PREFIX}{self.rank}", str(self._beats))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending
                return

    def _read(self) -> dict[int, int]:
        out = {}
        for r in range(self.world):
            key = f"{PREFIX}{r}"
            if self.store.check([key]):
                out[r] = int(self.store.get(key))
        return out

    def silent_ranks(self, wait: float | None = None) -> list[int]:
        """The other ranks whose heartbeat did not move over ``wait`` seconds (default: three
        intervals); a rank that never beat counts as silent."""
        try:
            before = self._read()
            time.sleep(3 * self.interval if wait is None else wait)
            after = self._read()
        except Exception:  # noqa: BLE001 - the store itself is unreachable
            return []
        return [r for r in range(self.world)
                if r != self.rank and (r not in after or after[r] == before.get(r))]


def start_heartbeat(rank: int, world: int) -> Heartbeat | None:
    """This rank's heartbeat in the default process group's store (several ranks only)."""
    if world < 2:
        return None
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (e.g. a group made without one)
        return None
    return Heartbeat(store, rank, world).start()

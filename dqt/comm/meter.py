"""Bytes on the wire, counted from the tensors actually handed to collectives (``docs/design.md``,
invariant 4).

``comm/bytes_sent`` is what this rank transmits for a collective of the given input under the
standard bandwidth-optimal algorithm for that collective (what gloo and NCCL run):

* ``all_reduce`` of S bytes (ring: reduce-scatter + all-gather) ........ 2(N−1)/N · S
* ``all_to_all_single`` with S input bytes (every chunk but its own) ... (N−1)/N · S
* ``all_gather`` / ``all_gather_into_tensor`` of S bytes per rank ...... (N−1) · S
* ``broadcast`` of S bytes from the source ............................. S (source), 0 (others)

``comm/bytes_raw`` is the same figure for the uncompressed fp32 all-reduce the scheme replaces,
so ``comm/ratio = bytes_raw / bytes_sent``. With one rank nothing crosses a wire: both are 0.
``comm/payload_bytes`` is the plain sum of input tensor sizes handed to collectives.

PyTorch's own hooks call ``torch.distributed.all_reduce`` internally; :func:`count_all_reduces`
wraps that function (once, transparently) so their traffic is counted like dqt's own.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


def wire_bytes(op: str, nbytes: int, world: int, is_src: bool = True) -> int:
    """Bytes one rank sends for collective ``op`` over a buffer of ``nbytes`` on ``world``
    ranks, as bandwidth-optimal algorithms move them (a ring all-reduce sends
    2(N − 1)/N of the buffer); what every scheme's meter counts."""
    if world <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (world - 1) * nbytes // world
    if op == "all_to_all":
        return (world - 1) * nbytes // world
    if op == "all_gather":
        return (world - 1) * nbytes
    if op == "broadcast":
        return nbytes if is_src else 0
    raise ValueError(f"unknown collective {op!r}")


@dataclass
class CommMeter:
    """Per-step communication figures of one rank; :meth:`pop` returns and resets them."""

    bytes_sent: int = 0
    bytes_raw: int = 0
    payload_bytes: int = 0
    collectives: int = 0
    hook_s: float = 0.0
    total_sent: int = 0
    total_raw: int = 0
    gather_sent: int = 0
    gather_raw: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    # a bucket is encoded on the autograd thread and finished on the scheme's communication
    # thread (dqt.comm.overlap): both count
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, op: str, tensor: torch.Tensor, world: int, is_src: bool = True) -> None:
        n = tensor.numel() * tensor.element_size()
        with self._lock:
            self.payload_bytes += n
            self.bytes_sent += wire_bytes(op, n, world, is_src)
            self.collectives += 1

    def record_raw(self, numel: int, world: int, element_size: int = 4) -> None:
        with self._lock:
            self.bytes_raw += wire_bytes("all_reduce", numel * element_size, world)

    def add_gather(self, sent: int, raw: int) -> None:
        """A parameter all-gather in a narrower dtype (FSDP, :mod:`dqt.comm.fsdp`): the bytes
        this rank sent and what the fp32 all-gather would have sent (``comm/gather_*``, apart
        from the gradients' figures)."""
        with self._lock:
            self.gather_sent += sent
            self.gather_raw += raw

    def add_time(self, key: str, seconds: float) -> None:
        with self._lock:
            self.extra[key] = self.extra.get(key, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        with self._lock:
            return self._pop()

    def _pop(self) -> dict[str, float]:
        self.total_sent += self.bytes_sent
        self.total_raw += self.bytes_raw
        out: dict[str, float] = {
            "comm/bytes_sent": self.bytes_sent,
            "comm/bytes_raw": self.bytes_raw,
            "comm/payload_bytes": self.payload_bytes,
            "comm/collectives": self.collectives,
            "comm/bytes_sent_total": self.total_sent,
            "comm/bytes_raw_total": self.total_raw,
            "time/hook_ms": 1e3 * self.hook_s,
        }
        if self.bytes_sent:
            out["comm/ratio"] = self.bytes_raw / self.bytes_sent
        if self.gather_raw:
            out["comm/gather_bytes_sent"] = self.gather_sent
            out["comm/gather_bytes_raw"] = self.gather_raw
            self.gather_sent = self.gather_raw = 0
        out.update({f"time/{k}_ms": 1e3 * v for k, v in self.extra.items()})
        self.bytes_sent = self.bytes_raw = self.payload_bytes = self.collectives = 0
        self.hook_s = 0.0
        self.extra = {}
        return out


_meters: dict[Any, CommMeter] = {}


def _install_all_reduce_counter() -> None:
    if getattr(dist.all_reduce, "_dqt_counted", False):
        return
    original = dist.all_reduce

    @functools.wraps(original)
    def all_reduce(tensor, *args, **kwargs):
        group = kwargs.get("group", args[1] if len(args) > 1 else None)
        meter = _meters.get(group) if group is not None else None
        if meter is not None:
            meter.record("all_reduce", tensor, dist.get_world_size(group))
        return original(tensor, *args, **kwargs)

    all_reduce._dqt_counted = True  # type: ignore[attr-defined]
    dist.all_reduce = all_reduce


def count_all_reduces(group: dist.ProcessGroup, meter: CommMeter) -> None:
    """Record every ``torch.distributed.all_reduce`` issued on ``group`` — from any thread,
    including the ``Future.then`` callbacks of PowerSGD — into ``meter``. Give each scheme a
    group of its own (``dist.new_group()``) so the trainer's own collectives are not counted."""
    _install_all_reduce_counter()
    _meters[group] = meter

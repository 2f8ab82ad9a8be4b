"""Non-blocking DDP hooks: a bucket's collectives on a communication thread of the scheme's own.

A DDP communication hook runs on the autograd thread when a bucket's gradients are ready, and
DDP waits for the future it returns only at the end of backward. A hook that communicates
inline holds the autograd thread for the whole exchange, so the wire never overlaps the rest of
backward. :class:`CommThread` gives the hook a way out that stays deadlock-free:

* the hook encodes the bucket on the autograd thread (the generator of
  :mod:`dqt.comm.collective` runs up to its first request) and hands the started generator to
  the thread with a pending :class:`torch.futures.Future`;
* one thread per scheme drives the generators first in, first out with blocking collectives on
  the scheme's own process group (:func:`dqt.comm.collective.run_sync`: phase 1, decode,
  re-encode, phase 2, decode) and completes each future with the averaged bucket;
* every rank hands over its buckets in DDP's bucket order, so every rank's thread issues the
  same collectives in the same order on a group nothing else uses. No collective is ever
  launched from inside a future's callback, which is how PyTorch's PowerSGD hook deadlocks on
  gloo with several buckets;
* on CUDA the thread runs on a side stream that first waits for the event the hook recorded
  after encoding, and the future is created for the bucket's device: completing it records an
  event on the side stream, and DDP's wait makes the consuming stream wait for that event;
* an exception on the thread fails that bucket's future (DDP raises it at the end of backward
  on the autograd thread) and every later one, naming the first failure: the collectives'
  order cannot be trusted after it.

The hook must do anything that issues a collective on the scheme's group through the thread or
after :meth:`CommThread.drain`, which returns once every handed-over bucket is done.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from dqt.comm.collective import BucketWork, Request

Driver = Callable[[Request, BucketWork], torch.Tensor]


def _value(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()


class CommThread:
    """One daemon thread that completes buckets' work in the order it was handed over."""

    def __init__(self, drive: Driver, name: str) -> None:
        """``drive(first_request, work)`` carries a started bucket to its result; ``name``:
        the scheme's, for messages and the thread's name."""
        self._drive = drive
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._failure: BaseException | None = None
        self._stream = None
        self._thread = threading.Thread(target=self._run, name=f"dqt-comm-{name}", daemon=True)
        self._thread.start()

    def submit(self, first: Request, work: BucketWork, device: torch.device) -> torch.futures.Future:
        """Hand over a started bucket (its first request and its generator); returns the
        pending future of the averaged bucket."""
        cuda = device.type == "cuda"
        fut = torch.futures.Future(devices=[device] if cuda else None)
        event = None
        if cuda:  # the encode ran on the autograd thread's current stream
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        with self._idle:
            self._pending += 1
        self._queue.put((first, work, fut, event, device))
        # read through ``then``: an exception set on ``fut`` becomes the error of the future
        # DDP waits on, raised by backward with its message (DDP reads a Python future's raw
        # value and would report the exception object as "Unable to cast ... to Tensor")
        return fut.then(_value)

    def drain(self) -> None:
        """Block until every handed-over bucket is done (its future completed)."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0)

    @property
    def pending(self) -> int:
        return self._pending

    def _run(self) -> None:
        while True:
            first, work, fut, event, device = self._queue.get()
            if event is None:
                self._complete(first, work, fut)
                continue
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._stream):  # set_result records its event here too
                self._stream.wait_event(event)
                self._complete(first, work, fut)

    def _complete(self, first: Request, work: BucketWork, fut: torch.futures.Future) -> None:
        try:
            if self._failure is not None:
                raise RuntimeError("dqt: an earlier bucket's communication failed on this rank "
                                   f"({self._failure!r}); the scheme cannot continue")
            out = self._drive(first, work)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting DDP
            if self._failure is None:
                self._failure = e
            e = RuntimeError(f"dqt: scheme {self._name}: a bucket's exchange failed on this rank: "
                             f"{type(e).__name__}: {e}")
            work.close()
            self._done()
            fut.set_exception(e)
        else:
            self._done()
            fut.set_result(out)

    def _done(self) -> None:
        # counted as done before its future completes: every collective of the bucket has
        # been issued, and DDP may start the next step as soon as the last future is set
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

"""dqt's schemes under Horovod (``backend=horovod``, launched by ``horovodrun``).

Horovod's own ``Compression`` only casts a tensor before a *summing* all-reduce: it cannot
carry 1-bit or ternary payloads (a sum of packed bytes means nothing) and keeps no per-tensor
state for error feedback. Here Horovod carries dqt's messages instead:

* :class:`HorovodDataParallel` does what ``hvd.DistributedOptimizer`` does — a hook on every
  parameter's gradient accumulation launches the communication of a bucket as soon as its
  last gradient is ready, so the wire overlaps the rest of the backward pass (Horovod's
  background thread runs the collectives), and the end of backward waits for them all — but
  with DDP's buckets (everything in one bucket on the first step, then rebuilt once in the
  order the gradients became ready, 1 MiB first bucket, 25 MiB after: PyTorch's own
  ``_compute_bucket_assignment_by_size``), so a scheme sees exactly the buckets it sees under
  DDP and the result is bitwise the torch.distributed path's.
* A bucket's work is the scheme's generator of collective requests
  (:meth:`dqt.comm.compressed_scheme.CompressedScheme.bucket_work`): the compressed two-phase
  all-reduce asks for ``all_to_all`` then ``all_gather``; :class:`HorovodRunner` launches
  them with ``hvd.alltoall_async`` / ``hvd.allgather_async`` (the second phase of every
  bucket in one ``hvd.grouped_allgather_async``) and ``hvd.allreduce_async_`` for plain
  buckets (warm-up, small buckets), by name, so ranks may launch in any order.
* :class:`HorovodPlainScheme`: ``allreduce`` (no ``+scheme``) and ``fp16`` — PyTorch's
  ``allreduce_hook`` / ``fp16_compress_hook`` maths (divide by N, sum, cast back) on
  ``hvd.allreduce_async_``. ``bf16`` (Horovod has no bfloat16 collectives), ``powersgd``
  (PyTorch's hook calls torch.distributed itself) and ``scheme.auto`` are refused by the
  config check, naming the key.

Bytes are counted from the tensors handed to Horovod (the same meter calls as the DDP path,
so ``comm/bytes_sent`` is identical). The trainer's control messages (metric sums, the stop
flag, QAT range statistics, the parameter digest) go over a small torch.distributed gloo
group that :func:`dqt.train.distributed.init` sets up through Horovod's own broadcast.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from dqt.comm.collective import BucketWork, Request
from dqt.comm.compressed_scheme import CompressedScheme
from dqt.comm.config import CompressedConfig
from dqt.comm.scheme import Scheme

FIRST_BUCKET_BYTES = 1024 * 1024  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_BYTES = 25 * 1024 * 1024  # DDP's bucket_cap_mb=25


def hvd_module() -> Any:
    """``horovod.torch``, or an ImportError that says how to get it."""
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise ImportError("backend=horovod needs Horovod built with PyTorch and Gloo: run "
                          "`make horovod` (see README, 'Horovod'); the import said: "
                          f"{e}") from e
    return hvd


class _Bucket:
    """The part of ``torch.distributed.GradBucket`` a scheme uses: a flat buffer holding the
    bucket's gradients (views into it), its parameters, its index."""

    def __init__(self, index: int, params: list[nn.Parameter], last: bool) -> None:
        self._index, self._params, self._last = index, params, last
        n = sum(p.numel() for p in params)
        p0 = params[0]
        self._buf = torch.empty(n, dtype=p0.dtype, device=p0.device)
        self._grads, off = [], 0
        for p in params:
            self._grads.append(self._buf[off:off + p.numel()].view_as(p))
            off += p.numel()

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def buffer(self) -> torch.Tensor:
        return self._buf

    def gradients(self) -> list[torch.Tensor]:
        return self._grads

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def fill(self) -> None:
        for g, p in zip(self._grads, self._params):
            g.copy_(p.grad)

    def write_back(self, out: torch.Tensor) -> None:
        off = 0
        for p in self._params:
            p.grad.copy_(out[off:off + p.numel()].view_as(p))
            off += p.numel()


class HorovodRunner:
    """Carries buckets' collective requests over Horovod, asynchronously: :meth:`launch` when a
    bucket is ready (backward goes on), :meth:`finish` at the end of backward drives every
    bucket's generator to its result, launching follow-up requests of all buckets together
    (grouped by kind) so the second phases travel in one Horovod cycle."""

    def __init__(self, meter: Any) -> None:
        self.hvd = hvd_module()
        self.meter = meter
        self._pending: list[tuple[Any, BucketWork, Request, int]] = []  # bucket, work, req, k

    def _name(self, bucket: Any, k: int) -> str:
        return f"dqt.b{bucket.index()}.{k}"

    def _launch_one(self, req: Request, name: str) -> Any:
        hvd = self.hvd
        if req.op == "all_to_all":
            return hvd.alltoall_async(req.tensor, name=name)
        if req.op == "all_gather":
            return hvd.allgather_async(req.tensor, name=name)
        return hvd.allreduce_async_(req.tensor, op=hvd.Sum, name=name)

    def launch(self, bucket: Any, req: Request, work: BucketWork) -> None:
        self._pending.append((bucket, work, req, self._launch_one(req, self._name(bucket, 0))))

    def _launch_group(self, items: list[tuple[Any, BucketWork, Request, int]]) -> list[Any]:
        """Start the requests of several buckets: all_gathers as one grouped op, the rest one
        by one. Returns one handle (or (group handle, position)) per item."""
        hvd = self.hvd
        gathers = [i for i, (_, _, r, _) in enumerate(items) if r.op == "all_gather"]
        handles: list[Any] = [None] * len(items)
        if len(gathers) > 1:
            name = "dqt.group." + ".".join(self._name(items[i][0], items[i][3]) for i in gathers)
            h = hvd.grouped_allgather_async([items[i][2].tensor for i in gathers], name=name)
            for pos, i in enumerate(gathers):
                handles[i] = (h, pos)
        for i, (bucket, _, req, k) in enumerate(items):
            if handles[i] is None:
                handles[i] = self._launch_one(req, self._name(bucket, k))
        return handles

    def _result(self, handle: Any, req: Request, cache: dict[int, Any]) -> torch.Tensor:
        if isinstance(handle, tuple):  # a grouped op: one synchronize for the whole group
            h, pos = handle
            if id(h) not in cache:
                cache[id(h)] = (h, self.hvd.synchronize(h))
            return cache[id(h)][1][pos]
        got = self.hvd.synchronize(handle)
        if req.op == "all_to_all":  # (output, received splits)
            got = got[0]
        return req.tensor if req.op == "all_reduce" else got

    def finish(self) -> list[tuple[Any, torch.Tensor]]:
        """Wait for every launched bucket, run its remaining maths and collectives; returns
        (bucket, averaged buffer) in bucket order."""
        items = [(b, w, r, 0) for b, w, r, _ in self._pending]
        handles = [h for *_, h in self._pending]
        self._pending = []
        done: list[tuple[Any, torch.Tensor]] = []
        while items:
            cache: dict[int, Any] = {}
            nxt: list[tuple[Any, BucketWork, Request, int]] = []
            for (bucket, work, req, k), h in zip(items, handles):
                t0 = time.perf_counter()
                got = self._result(h, req, cache)
                self.meter.add_time("communicate", time.perf_counter() - t0)
                try:
                    nxt.append((bucket, work, work.send(got), k + 1))
                except StopIteration as stop:
                    done.append((bucket, stop.value))
            items = nxt
            handles = self._launch_group(items) if items else []
        return sorted(done, key=lambda d: d[0].index())


class HorovodDataParallel(nn.Module):
    """``module`` with its gradients averaged over Horovod ranks by a dqt scheme — the role DDP
    plays for the torch.distributed backends (see the module docstring)."""

    def __init__(self, module: nn.Module, bucket_cap_mb: float | None = None) -> None:
        super().__init__()
        self.module = module
        # DDP's rule: the default is 25 MiB with a first bucket of 1 MiB; a cap given is every
        # bucket's, the first included
        cap = None if bucket_cap_mb is None else int(bucket_cap_mb * 1024 * 1024)
        self._limits = [FIRST_BUCKET_BYTES, BUCKET_BYTES] if cap is None else [cap, cap]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.scheme: Optional[Any] = None
        self._sync_grads = True
        self._ready_order: list[int] = []
        self._rebuilt = False
        self._set_buckets([list(range(len(self.params)))])  # DDP: one bucket on step 1
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def attach_scheme(self, scheme: Any) -> None:
        self.scheme = scheme
        self.runner = HorovodRunner(scheme.meter)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (gradient accumulation), like ``DDP.no_sync``."""
        old, self._sync_grads = self._sync_grads, False
        try:
            yield
        finally:
            self._sync_grads = old

    # ------------------------------------------------------------------ buckets
    def _set_buckets(self, indices: list[list[int]]) -> None:
        n = len(indices)
        self.buckets = [_Bucket(i, [self.params[j] for j in idx], i == n - 1)
                        for i, idx in enumerate(indices)]
        self._bucket_of = {j: i for i, idx in enumerate(indices) for j in idx}

    def _rebuild(self) -> None:
        """DDP's one rebuild after the first step: buckets by gradient-ready order."""
        order = self._ready_order
        if len(order) == len(self.params):
            idx, _ = dist._compute_bucket_assignment_by_size(
                [self.params[i] for i in order], self._limits,
                [False] * len(order), order)
            self._set_buckets([list(b) for b in idx])
        self._rebuilt = True

    # ------------------------------------------------------------------ backward
    def _grad_ready(self, p: torch.Tensor) -> None:
        if not self._sync_grads or self.scheme is None:
            return
        i = self._index[id(p)]
        if not self._rebuilt:
            self._ready_order.append(i)
        if not self._in_backward:
            self._start_backward()
        b = self._bucket_of[i]
        self._missing[b] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self.buckets[self._next])  # in bucket order, as DDP launches
            self._next += 1

    @property
    def _in_backward(self) -> bool:
        return getattr(self, "_active", False)

    def _start_backward(self) -> None:
        self._active = True
        self._missing = [len(b.parameters()) for b in self.buckets]
        self._next = 0
        torch.autograd.Variable._execution_engine.queue_callback(self._finish)

    def _launch(self, bucket: _Bucket) -> None:
        start = time.perf_counter()
        bucket.fill()
        req, work = self.scheme.bucket_work(bucket)
        self.runner.launch(bucket, req, work)
        self.scheme.meter.hook_s += time.perf_counter() - start

    def _finish(self) -> None:
        """End of backward: every bucket must have been launched (DDP's unused-parameter
        error otherwise), then wait for them and write the averages into ``.grad``."""
        self._active = False
        if self._next != len(self.buckets):
            missing = [n for n, p in self.module.named_parameters() if p.requires_grad
                       and self._bucket_of[self._index[id(p)]] >= self._next and p.grad is None]
            raise RuntimeError("backend=horovod: some parameters got no gradient this step "
                               f"({', '.join(missing[:5]) or 'unknown'}); every trainable "
                               "parameter must take part in the loss")
        start = time.perf_counter()
        for bucket, out in self.runner.finish():
            bucket.write_back(out)
        self.scheme.meter.hook_s += time.perf_counter() - start
        if not self._rebuilt:
            self._rebuild()


class HorovodPlainScheme(Scheme):
    """``allreduce`` and ``fp16`` over ``hvd.allreduce_async_`` with PyTorch's hook maths:
    fp32 — g/N summed in place (``allreduce_hook``); fp16 — (fp16(g))/N summed in fp16, cast
    back (``fp16_compress_hook``)."""

    def __init__(self, name: str, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(process_group)
        self.name = name
        self.dtype = torch.float16 if name == "fp16" else torch.float32

    def attach(self, model: Any) -> None:
        model.attach_scheme(self)

    def bucket_work(self, bucket: Any) -> tuple[Request, BucketWork]:
        buf = bucket.buffer()
        self.meter.record_raw(buf.numel(), self.world_size)
        work = self._work(buf)
        return next(work), work

    def _work(self, buf: torch.Tensor) -> BucketWork:
        t = buf if buf.dtype == self.dtype else buf.to(self.dtype)
        t.div_(self.world_size)
        self.meter.record("all_reduce", t, self.world_size)
        got = yield Request("all_reduce", t)
        return got if got.dtype == buf.dtype else got.to(buf.dtype)


PLAIN = ("allreduce", "fp16")
UNSUPPORTED = {
    "bf16": "Horovod has no bfloat16 collectives (use +scheme=fp16, or a dqt scheme)",
    "powersgd": "PyTorch's PowerSGD hook issues torch.distributed collectives itself (use a "
                "dqt scheme, or a torch.distributed backend)",
}


def build_horovod_scheme(cfg: Any) -> Scheme:
    """The scheme for ``backend=horovod`` (the config check has refused the unsupported)."""
    name = "allreduce" if cfg is None else cfg.name
    if name in PLAIN:
        return HorovodPlainScheme(name)
    if isinstance(cfg, CompressedConfig):
        return CompressedScheme(cfg, None)
    raise ValueError(f"scheme.name={name}: not available with backend=horovod: "
                     f"{UNSUPPORTED.get(name, 'unknown scheme')}")

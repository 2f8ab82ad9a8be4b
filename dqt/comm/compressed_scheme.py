"""dqt's compression schemes as one DDP communication hook: ``onebit``, ``signsgd``,
``ef_signsgd``, ``ternary_grad``, ``qsgd``.

Per bucket and step:

* warm-up (``scheme.warmup_steps``) and small buckets (< ``scheme.min_bucket_numel``) go through
  a plain fp32 all-reduce on the scheme's own group — the same decision on every rank;
* otherwise the compressed all-reduce of :mod:`dqt.comm.collective` over the bucket's layout
  (:mod:`dqt.comm.layout`: blocks in parameter order that never cross a tensor), with worker
  and server error feedback for biased schemes, through the fused kernels (``scheme.kernel``:
  ``auto`` = C on CPU, Triton on CUDA; ``reference`` = the pure-torch reference);
* a block holding inf/nan is not sanitized: NaN reaches every rank (so GradScaler skips the
  step) and that block's residual is not updated;
* with ``scheme.auto``, each bucket's first ``auto_trials`` compressed steps also time a plain
  fp32 all-reduce of a copy of the bucket; the slowest rank's times decide, for good and on
  every rank alike, whether the bucket stays compressed or falls back to the plain all-reduce
  (compression loses on fast links, where encoding costs more than the bytes it saves).

The per-bucket maths is a generator of collective requests (:mod:`dqt.comm.collective`). Under
DDP the hook runs it up to its first request (the encode) on the autograd thread and returns a
pending future; the scheme's communication thread (:mod:`dqt.comm.overlap`) carries the
collectives and the decoding in DDP's bucket order, so the wire overlaps the rest of backward
and every rank issues the same collectives in the same order on the scheme's own group
(``scheme.overlap``; ``false``: all of it inline, a completed future). The Horovod backend
(:mod:`dqt.comm.horovod`) runs the very same generators with Horovod's asynchronous
collectives through :meth:`bucket_work`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dqt.comm.buckets import BucketGroups, SubBucket
from dqt.comm.collective import (BucketContext, BucketWork, Request, allgather_allreduce,
                                 run_started, run_sync, two_phase_allreduce)
from dqt.comm.compressors import Compressor
from dqt.comm.config import SCHEME_CONFIGS, CompressedConfig
from dqt.comm.error_feedback import FlatResidual
from dqt.comm.layout import BucketLayout, ParamSlot, build_layout
from dqt.comm.overlap import CommThread
from dqt.comm.scheme import Scheme, register_scheme

log = logging.getLogger("dqt")


class CompressedScheme(Scheme):
    def __init__(self, cfg: CompressedConfig, process_group: dist.ProcessGroup | None) -> None:
        super().__init__(process_group)
        self.cfg = cfg
        self.name = cfg.name
        self.compressor = Compressor(cfg)
        self.spec = self.compressor.spec
        self.vote = self.compressor.vote
        self.error_feedback = bool(cfg.error_feedback)
        self.two_phase = cfg.collective == "two_phase"
        self.rank = dist.get_rank(self.process_group)
        self.step = 0
        self.grad_scale = 1.0
        self.worker: FlatResidual | None = None
        self.server: FlatResidual | None = None
        self._layouts: dict[tuple[Any, ...], BucketLayout] = {}
        self.auto_choice: dict[int, bool] = {}  # bucket id -> compress (scheme.auto)
        self._auto_times: dict[int, list[torch.Tensor]] = {}
        self._precondition: Callable[[torch.Tensor], torch.Tensor | None] | None = None
        self._scales: dict[int, torch.Tensor] = {}  # id(layout) -> the bucket's preconditioner
        self._bound: float | None = None
        self._thread: CommThread | None = None  # scheme.overlap under DDP
        self.groups = BucketGroups()  # bucket compositions, saved so a resume follows them

    def set_preconditioner(self, scale: Callable[[torch.Tensor], torch.Tensor | None],
                           bound: float | None = None) -> None:
        """Compress each gradient divided by ``scale(param)`` (a tensor shaped as the
        parameter, equal on every rank and constant once given, e.g.
        :meth:`dqt.optim.FrozenVarianceAdamW.preconditioner`; None: not yet) and multiply the
        decoded average back. The average is unchanged; the codec's error, shared by each block
        of values, becomes proportional to ``scale``. The residuals of error feedback live in
        the scaled units.

        ``bound``: clamp the scaled gradient to ±bound before encoding (infinities pass, so an
        overflow is still seen), e.g. :attr:`dqt.optim.FrozenVarianceAdamW.step_bound`. A
        coordinate whose frozen scale is far below its current gradient would otherwise set
        its block's scale (ternary and QSGD code every value relative to the block's largest)
        and turn the rest of the block into noise."""
        self._precondition = scale
        self._bound = None if bound is None else float(bound)
        self._scales.clear()

    def _scale(self, bucket: dist.GradBucket, layout: BucketLayout,
               buf: torch.Tensor) -> torch.Tensor | None:
        """The bucket's flat preconditioner, built once per bucket composition (its layout:
        DDP rebuilds its buckets after the first iteration), when every parameter has one."""
        if self._precondition is None:
            return None
        d = self._scales.get(id(layout))  # layouts are cached for the scheme's lifetime
        if d is None:
            parts = [self._precondition(p) for p in bucket.parameters()]
            if any(s is None for s in parts):
                return None
            d = torch.empty(buf.numel(), dtype=torch.float32, device=buf.device)
            for g, s in zip(bucket.gradients(), parts):
                off = (g.data_ptr() - buf.data_ptr()) // buf.element_size()
                d[off:off + g.numel()].copy_(s.reshape(-1))
            self._scales[id(layout)] = d
        return d

    def set_grad_scale(self, scale: float) -> None:
        self.grad_scale = float(scale)

    def attach(self, model: Any) -> None:
        """``model``: a DDP model (the hook), or a :class:`dqt.comm.horovod.HorovodDataParallel`
        (which calls :meth:`bucket_work`)."""
        params = [p for p in model.module.parameters() if p.requires_grad]
        self.index = FlatResidual(params, allocate=False)  # parameter → flat offset
        self.worker = FlatResidual(params) if self.error_feedback else None
        self.server = FlatResidual(params) if self.error_feedback and self.two_phase else None
        if isinstance(model, DistributedDataParallel):
            if self.cfg.overlap and self._thread is None:
                self._thread = CommThread(
                    lambda first, work: run_started(first, work, self.process_group, self.meter),
                    self.name)
            model.register_comm_hook(None, self._hook)
        else:
            model.attach_scheme(self)

    def _plain(self, n: int, step: int | None = None) -> bool:
        """Warm-up, small buckets and one rank: the plain fp32 all-reduce (same on all ranks)."""
        step = self.step if step is None else step
        return step < self.cfg.warmup_steps or n < self.cfg.min_bucket_numel or \
            self.world_size == 1

    # ------------------------------------------------------------------ the hook
    def _hook(self, state, bucket):  # unannotated: DDP checks annotations by identity
        start = time.perf_counter()
        buf = bucket.buffer()
        n, world = buf.numel(), self.world_size
        self.meter.record_raw(n, world)
        plain, trial = self._plain(n), False
        if not plain and self.cfg.auto:
            choice = self.auto_choice.get(self.layout(bucket, buf).first_param)
            plain, trial = choice is False, choice is None
        flats = [self.index.offset(p) for p in bucket.parameters()]
        groups = None if self.cfg.auto else self.groups.split(flats)
        if groups is None:
            self.groups.observe(bucket.index(), flats)
        if groups is not None:  # a resumed process's first step: the checkpoint's buckets
            work = self._split_work(bucket, groups)
            if self._thread is not None:
                fut = self._thread.submit(next(work), work, buf.device)
            else:
                fut = torch.futures.Future()
                fut.set_result(run_sync(work, self.process_group, self.meter))
        elif self._thread is not None and not trial:
            # encode here, the collectives and the decoding on the communication thread
            work = self._plain_work(buf) if plain else self._compressed(buf, bucket)
            fut = self._thread.submit(next(work), work, buf.device)
        elif plain:  # asynchronous, like DDP's own hook: the wire overlaps the rest of backward
            fut = self._plain_allreduce_async(buf)
        else:
            if self._thread is not None:  # a scheme.auto trial: its collectives come after
                self._thread.drain()      # every bucket already handed over, on every rank
            out = self._auto(buf, bucket) if trial else \
                run_sync(self._compressed(buf, bucket), self.process_group, self.meter)
            fut = torch.futures.Future()
            fut.set_result(out)
        if bucket.is_last():
            self.step += 1
        self.meter.hook_s += time.perf_counter() - start
        return fut

    def _split_work(self, bucket: Any, groups: list[list[int]]) -> BucketWork:
        """A bucket processed as the saved buckets ``groups`` (flat offsets, bucket order), one
        after another, each exactly as DDP's bucket of those parameters would be."""
        step = self.step  # the later groups run after the hook has counted the step
        by_flat = {self.index.offset(p): (p, g)
                   for p, g in zip(bucket.parameters(), bucket.gradients())}
        for flats in groups:
            sub = SubBucket([by_flat[f][0] for f in flats], [by_flat[f][1] for f in flats])
            buf = sub.buffer()
            out = yield from (self._plain_work(buf) if self._plain(buf.numel(), step)
                              else self._compressed(buf, sub, step))
            sub.write_back(out)
        return bucket.buffer()

    def _plain_allreduce(self, buf: torch.Tensor) -> torch.Tensor:
        return self._plain_allreduce_async(buf).wait()

    def _plain_allreduce_async(self, buf: torch.Tensor) -> torch.futures.Future:
        """fp32 mean all-reduce; fp32 buckets in place (as DDP's default hook), others through
        an fp32 copy that is cast back."""
        t = buf if buf.dtype == torch.float32 else buf.float()
        t.div_(self.world_size)
        self.meter.record("all_reduce", t, self.world_size)
        fut = dist.all_reduce(t, group=self.process_group, async_op=True).get_future()
        if t is buf:
            return fut.then(lambda f: f.value()[0])
        return fut.then(lambda f: f.value()[0].to(buf.dtype))

    def _auto(self, buf: torch.Tensor, bucket: dist.GradBucket) -> torch.Tensor:
        """scheme.auto, while the bucket is undecided: trial both paths on the first compressed
        steps, then record the faster in ``auto_choice`` (which the hook follows from then on)."""
        bid = self.layout(bucket, buf).first_param
        copy = buf.float()  # a copy also for fp32: the trial's plain all-reduce works in place
        copy = copy.clone() if copy is buf else copy
        self._sync(buf)
        t0 = time.perf_counter()
        out = run_sync(self._compressed(buf, bucket), self.process_group, self.meter)
        self._sync(buf)
        t1 = time.perf_counter()
        self._plain_allreduce(copy)  # timed only; its bytes were sent and are counted
        self._sync(buf)
        times = torch.tensor([t1 - t0, time.perf_counter() - t1], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX, group=self.process_group)
        trials = self._auto_times.setdefault(bid, [])
        trials.append(times)
        if len(trials) >= self.cfg.auto_trials:
            best = torch.stack(trials).min(0).values
            compress = float(best[0]) * self.cfg.auto_margin < float(best[1])
            self.auto_choice[bid] = compress
            if self.rank == 0:
                log.info("scheme.auto: bucket of %d values: compressed %.1f ms, plain fp32 "
                         "all-reduce %.1f ms -> %s", buf.numel(), 1e3 * float(best[0]),
                         1e3 * float(best[1]), "compressed" if compress else "plain all-reduce")
        return out

    @staticmethod
    def _sync(t: torch.Tensor) -> None:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)

    def layout(self, bucket: dist.GradBucket, buf: torch.Tensor) -> BucketLayout:
        """The bucket's block layout, built once per bucket composition (DDP rebuilds buckets
        once, after the first iteration)."""
        grads, params = bucket.gradients(), bucket.parameters()
        base, size = buf.data_ptr(), buf.element_size()
        key = tuple((p.data_ptr(), (g.data_ptr() - base) // size, g.numel())
                    for p, g in zip(params, grads))
        if key not in self._layouts:
            slots = [ParamSlot(self.index.offset(p), off, numel) for (_, off, numel), p
                     in zip(key, params)]
            chunks = self.world_size if self.two_phase else 1
            self._layouts[key] = build_layout(slots, chunks, self.rank, self.spec,
                                              flag=self.vote, device=buf.device)
        return self._layouts[key]

    def bucket_work(self, bucket: Any) -> tuple[Request, BucketWork]:
        """The DDP hook's decision and maths for one bucket as a started generator of collective
        requests: (its first request, the generator). The bucket's compression (encode) has
        run when this returns; the caller carries the requests and sends back what it
        received, and the generator returns the averaged bucket. Not with ``scheme.auto``."""
        buf = bucket.buffer()
        self.meter.record_raw(buf.numel(), self.world_size)
        flats = [self.index.offset(p) for p in bucket.parameters()]
        groups = self.groups.split(flats)
        if groups is not None:  # a resumed process's first step: the checkpoint's buckets
            work = self._split_work(bucket, groups)
        else:
            self.groups.observe(bucket.index(), flats)
            plain = self._plain(buf.numel())
            work = self._plain_work(buf) if plain else self._compressed(buf, bucket)
        first = next(work)
        if bucket.is_last():
            self.step += 1
        return first, work

    def _plain_work(self, buf: torch.Tensor) -> BucketWork:
        """:meth:`_plain_allreduce_async` as a request: fp32 mean, cast back."""
        t = buf if buf.dtype == torch.float32 else buf.float()
        t.div_(self.world_size)
        self.meter.record("all_reduce", t, self.world_size)
        got = yield Request("all_reduce", t)
        return got if t is buf else got.to(buf.dtype)

    def _compressed(self, buf: torch.Tensor, bucket: dist.GradBucket,
                    step: int | None = None) -> BucketWork:
        layout = self.layout(bucket, buf)
        in_place = buf.dtype == torch.float32 and buf.is_contiguous()
        x = buf if in_place else buf.float().contiguous()
        scale = self._scale(bucket, layout, buf)
        if scale is not None:
            x.div_(scale)
            if self._bound is not None:  # in the gradient's (loss-scaled) units
                b = self._bound * self.grad_scale
                torch.where(x.isinf(), x, x.clamp(-b, b), out=x)
        ctx = BucketContext(self.rank, self.world_size, self.cfg.seed,
                            self.step if step is None else step,
                            layout.first_param, self.meter, self.cfg.kernel)
        worker = self.worker.buffer if self.worker is not None else None
        # the average is decoded straight into the bucket (read first, written last): no
        # allocation and no copy back in DDP
        out = x if in_place else None
        if self.two_phase:
            server = self.server.buffer if self.server is not None else None
            out = yield from two_phase_allreduce(self.spec, x, layout, ctx, worker, server,
                                                 self.grad_scale, self.vote, out=out)
        else:
            out = yield from allgather_allreduce(self.spec, x, layout, ctx, worker,
                                                 self.grad_scale, self.vote, out=out)
        if scale is not None:
            out.mul_(scale)
        return out if in_place else out.to(buf.dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step,
                "worker_residual": self.worker.state_dict() if self.worker else None,
                "server_residual": self.server.state_dict() if self.server else None,
                "auto_choice": dict(self.auto_choice),
                "buckets": self.groups.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.auto_choice = dict(state.get("auto_choice") or {})  # a resume keeps the choices
        self.groups.load_state_dict(state.get("buckets"))  # and follows the saved buckets
        if self.worker is not None and state.get("worker_residual") is not None:
            self.worker.load_state_dict(state["worker_residual"])
        if self.server is not None and state.get("server_residual") is not None:
            self.server.load_state_dict(state["server_residual"])


@register_scheme(*(c for c in SCHEME_CONFIGS.values() if issubclass(c, CompressedConfig)))
def _compressed(cfg: CompressedConfig, pg: dist.ProcessGroup | None) -> Scheme:
    return CompressedScheme(cfg, pg)

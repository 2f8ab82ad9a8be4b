"""dqt's compression schemes as one DDP communication hook: ``onebit``, ``signsgd``,
``ef_signsgd``, ``ternary_grad``, ``qsgd``.

Per bucket and step:

* warm-up (``scheme.warmup_steps``) and small buckets (< ``scheme.min_bucket_numel``) go through
  a plain fp32 all-reduce on the scheme's own group — the same decision on every rank;
* otherwise the bucket is put into parameter order (so chunks and scale blocks do not depend
  on DDP's bucket layout, which changes after the first iteration and across a resume),
  ``v = g + S·e`` (worker error feedback, S = current loss scale), the compressed all-reduce
  of :mod:`dqt.comm.collective`, ``e ← (v − C(v))/S``, and the result back in bucket order;
* a bucket holding inf/nan on any rank is not sanitized: the non-finite values propagate to
  every rank (so GradScaler skips the step) and no residual is updated from it.

The work runs inline in the hook and the hook returns a completed future. All ranks therefore
issue their collectives in DDP's bucket order from one thread, which cannot deadlock the way
callback-chained hooks can on gloo.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dqt.comm.collective import BucketContext, allgather_allreduce, two_phase_allreduce
from dqt.comm.compressors import build_compressor
from dqt.comm.error_feedback import FlatResidual
from dqt.comm.scheme import SCHEMES, Scheme

NAMES = ("onebit", "signsgd", "ef_signsgd", "ternary_grad", "qsgd")


class CompressedScheme(Scheme):
    def __init__(self, cfg: Any, process_group: dist.ProcessGroup | None) -> None:
        super().__init__(process_group)
        self.cfg = cfg
        self.name = cfg.name
        options: dict[str, Any] = {}
        if cfg.block_size is not None:
            options["block_size"] = cfg.block_size
        if cfg.scale_dtype is not None:
            options["scale_dtype"] = cfg.scale_dtype
        if cfg.name == "ternary_grad":
            options.update(format=cfg.format, clip_sigma=cfg.clip_sigma)
        if cfg.name == "qsgd":
            options["bits"] = cfg.bits
        self.compressor = build_compressor(cfg.name, **options)
        self.error_feedback = bool(cfg.error_feedback)
        self.majority_vote = cfg.name == "signsgd"
        self.two_phase = cfg.collective == "two_phase"
        self.rank = dist.get_rank(self.process_group)
        self.step = 0
        self.grad_scale = 1.0
        self.worker: FlatResidual | None = None
        self.server: FlatResidual | None = None

    def set_grad_scale(self, scale: float) -> None:
        self.grad_scale = float(scale)

    def attach(self, model: DistributedDataParallel) -> None:
        params = [p for p in model.module.parameters() if p.requires_grad]
        self.layout = FlatResidual(params, allocate=False)
        self.worker = FlatResidual(params) if self.error_feedback else None
        self.server = FlatResidual(params) if self.error_feedback and self.two_phase else None
        model.register_comm_hook(None, self._hook)

    # ------------------------------------------------------------------ the hook
    def _hook(self, state, bucket):  # unannotated: DDP checks annotations by identity
        start = time.perf_counter()
        buf = bucket.buffer()
        n, world = buf.numel(), self.world_size
        self.meter.record_raw(n, world)
        if self.step < self.cfg.warmup_steps or n < self.cfg.min_bucket_numel or world == 1:
            out = self._plain_allreduce(buf)
        else:
            out = self._compressed(buf, bucket)
        if bucket.is_last():
            self.step += 1
        self.meter.hook_s += time.perf_counter() - start
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(out)
        return fut

    def _plain_allreduce(self, buf: torch.Tensor) -> torch.Tensor:
        t = buf.float() / self.world_size
        dist.all_reduce(t, group=self.process_group)
        self.meter.record("all_reduce", t, self.world_size)
        return t.to(buf.dtype)

    def _compressed(self, buf: torch.Tensor, bucket: dist.GradBucket) -> torch.Tensor:
        order, idx = self.layout.canonical(bucket.parameters())  # compress in parameter order
        g = buf.float() if order is None else buf.float().index_select(0, order)
        v = g if self.worker is None else g + self.grad_scale * self.worker.get(idx)
        ctx = BucketContext(self.process_group, self.rank, self.world_size, self.cfg.seed,
                            self.step, bucket.index(), self.meter)
        comp = self._compressor_for(v)
        new_server, owned = None, None
        if not self.two_phase:
            out, local = allgather_allreduce(comp, v, ctx, self.worker is not None,
                                             self.majority_vote)
        else:
            server_e = None
            if self.server is not None:
                owned = self._owned_index(idx, v.numel())
                server_e = self.server.get(owned) if owned.numel() else None
                server_e = _pad_to(server_e, -(-v.numel() // self.world_size))
            out, local, new_server = two_phase_allreduce(
                comp, v, ctx, self.worker is not None, server_e, self.majority_vote)
        # The output is identical on every rank: if it is not finite, GradScaler skips the
        # step everywhere, so no rank may fold this bucket into its residuals.
        if bool(torch.isfinite(out).all()):
            if new_server is not None and owned is not None and owned.numel():
                self.server.put(owned, new_server[:owned.numel()])
            if self.worker is not None and local is not None:
                self.worker.put(idx, (v - local) / self.grad_scale)
        if order is not None:  # back to the bucket's own layout
            out = torch.empty_like(out).index_copy_(0, order, out)
        return out.to(buf.dtype)

    def _compressor_for(self, v: torch.Tensor) -> Any:
        """The compiled CPU path for large buckets (same bytes as the reference)."""
        limit = self.cfg.fused_min_numel
        if v.device.type == "cpu" and limit >= 0 and v.numel() >= limit:
            from dqt.comm.fused import fuse

            return fuse(self.compressor)
        return self.compressor

    def _owned_index(self, idx: torch.Tensor, n: int) -> torch.Tensor:
        """Flat positions of this rank's chunk of the bucket (server-side residual)."""
        c = -(-n // self.world_size)
        lo, hi = min(n, self.rank * c), min(n, (self.rank + 1) * c)
        return idx[lo:hi]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step,
                "worker_residual": self.worker.state_dict() if self.worker else None,
                "server_residual": self.server.state_dict() if self.server else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        if self.worker is not None and state.get("worker_residual") is not None:
            self.worker.load_state_dict(state["worker_residual"])
        if self.server is not None and state.get("server_residual") is not None:
            self.server.load_state_dict(state["server_residual"])


def _pad_to(x: torch.Tensor | None, c: int) -> torch.Tensor | None:
    if x is None:
        return None
    if x.numel() == c:
        return x
    out = torch.zeros(c, dtype=x.dtype, device=x.device)
    out[:x.numel()] = x
    return out


def _builder(cfg: Any, pg: dist.ProcessGroup | None) -> Scheme:
    return CompressedScheme(cfg, pg)


for _name in NAMES:
    SCHEMES.register(_name)(_builder)

"""Compressed all-reduce of one flat fp32 gradient bucket (layout: :mod:`dqt.comm.layout`,
maths and kernels: :mod:`dqt.kernels.blockq`).

**two-phase** (default; bandwidth-optimal, the DeepSpeed/Bagua structure with one collective
per phase):

1. encode every chunk — worker error feedback v = g + S·e for biased schemes — into N messages
   of M bytes (one fused kernel pass over the bucket);
2. ``all_to_all_single``: rank r receives chunk r of every peer (on gloo as point-to-point
   sends and receives: :func:`exchange`);
3. decode the N messages and sum in peer order (fp32), then average (÷N) — or, for
   ``signsgd``, take the majority vote sign(Σ signs) — written once into the owned chunk;
4. re-encode the owned chunk (server error feedback for biased schemes);
5. ``all_gather_single`` the N owned messages; every rank decodes the *same* bytes with
   the same code into the bucket, so the averaged gradient is bitwise identical on all ranks
   (``docs/design.md``, invariant 1).

Steps 1-3 alone are a compressed reduce-scatter (:func:`compressed_reduce_scatter`), what
FSDP's sharded gradients need (:mod:`dqt.comm.fsdp`).

Bytes per rank: (N−1)/N·N·M + (N−1)·M = 2(N−1)·M ≈ 2(N−1)/N × the packed bucket size.

**allgather** (for comparison; what PyTorch's quantization hooks and GRACE do): every rank
encodes the whole bucket as one message, ``all_gather`` → decode all N and average: (N−1)·M
bytes, O(N).

Stochastic rounding draws Philox numbers keyed by (seed, step, rank, bucket, phase) with one
counter per block. Majority-vote messages end in a flag byte (1 if a chunk held inf/NaN), since
scale-free sign bits cannot carry a non-finite value.

**Majority vote and ties.** The vote is sign(Σ signs). With an even number of ranks the sum can
be 0 (at N = 2, half of the coordinates of pure noise); a tie is broken by a fair coin, ±1 with
probability ½ each, drawn from a generator keyed by (seed, step, owner, bucket, phase 2) — the
owner of the chunk in two-phase (its choice then travels to every rank in phase 2), rank 0's key
on every rank in allgather mode — so the vote is unbiased and every rank ends with the same
signs. (Taking sign(0) = +1 would add +1 to the mean vote of half the coordinates at N = 2.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generator, Optional

import torch
import torch.distributed as dist

from dqt.comm.layout import BucketLayout
from dqt.comm.meter import CommMeter
from dqt.kernels import blockq
from dqt.kernels.blockq import BlockSpec
from dqt.kernels.philox import mix_seed

WORKER, SERVER, TIES = 0, 1, 2
# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def exchange(op: str, out: torch.Tensor, tensor: torch.Tensor,
             group: dist.ProcessGroup) -> None:
    """``all_to_all_single`` (op ``all_to_all``: peer p gets chunk p of ``tensor``) or
    ``all_gather`` (every peer gets ``tensor``) into ``out``, N equal chunks in rank order.

    On gloo both run as point-to-point sends and receives posted at once: gloo's own
    ``all_to_all_single`` and ``all_gather`` move messages of a few megabytes at half of a
    shaped link's rate or less, these at its full rate (docs/results.md, "gloo's collectives
    on a shaped link"). Other backends (NCCL) run the collective."""
    if dist.get_backend(group) != "gloo":
        run = dist.all_to_all_single if op == "all_to_all" else _all_gather_single
        run(out, tensor, group=group)
        return
    N, rank = dist.get_world_size(group), dist.get_rank(group)
    c = out.numel() // N
    ops = []
    for p in range(N):
        send = tensor[p * c:(p + 1) * c] if op == "all_to_all" else tensor
        if p == rank:
            out[p * c:(p + 1) * c].copy_(send)
            continue
        ops.append(dist.P2POp(dist.irecv, out[p * c:(p + 1) * c], group=group, group_peer=p))
        ops.append(dist.P2POp(dist.isend, send, group=group, group_peer=p))
    for w in dist.batch_isend_irecv(ops):
        w.wait()


@dataclass
class BucketContext:
    """Who/when (for the Philox keys), where to account, which kernels to run."""

    rank: int
    world: int
    seed: int
    step: int
    bucket: int
    meter: CommMeter
    impl: str = "auto"

    def key(self, phase: int) -> int:
        return mix_seed(self.seed, self.step, self.rank, self.bucket, phase)


@dataclass
class Request:
    """One collective a bucket's work asks for. ``tensor`` is what this rank contributes;
    ``out`` is the buffer a synchronous runner fills (``all_to_all``: N equal chunks, rank
    order; ``all_gather``: every rank's ``tensor``, rank order); ``all_reduce`` sums
    ``tensor`` in place. The generator is sent back the received tensor."""

    op: str  # "all_to_all" | "all_gather" | "all_reduce"
    tensor: torch.Tensor
    out: Optional[torch.Tensor] = None


BucketWork = Generator[Request, torch.Tensor, torch.Tensor]


def run_sync(work: BucketWork, group: dist.ProcessGroup, meter: CommMeter) -> torch.Tensor:
    """Drive a bucket's work to the end with blocking torch.distributed collectives (inside
    a DDP hook); the time spent in them is the meter's ``communicate``."""
    try:
        first = next(work)
    except StopIteration as stop:
        return stop.value
    return run_started(first, work, group, meter)


def run_started(req: Request, work: BucketWork, group: dist.ProcessGroup,
                meter: CommMeter) -> torch.Tensor:
    """:func:`run_sync` for a generator already run up to its first request ``req`` (the
    communication thread of :mod:`dqt.comm.overlap`)."""
    try:
        while True:
            t0 = time.perf_counter()
            if req.op in ("all_to_all", "all_gather"):
                exchange(req.op, req.out, req.tensor, group)
                got = req.out
            else:
                dist.all_reduce(req.tensor, group=group)
                got = req.tensor
            meter.add_time("communicate", time.perf_counter() - t0)
            req = work.send(got)
    except StopIteration as stop:
        return stop.value


def majority_vote(total: torch.Tensor, key: int) -> torch.Tensor:
    """In place: the sum of the peers' signs → its sign, a tie (0) → a fair coin from a generator
    seeded with ``key`` (deterministic), NaN (a flagged chunk) kept."""
    ties = total == 0
    k = int(ties.sum())
    total.copy_(torch.where(total > 0, 1.0, torch.where(total < 0, -1.0, total)))
    if k:
        g = torch.Generator().manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)
        coin = torch.randint(0, 2, (k,), generator=g).to(total.device, total.dtype) * 2 - 1
        total[ties] = coin
    return total


def _flag_bytes(msgs: torch.Tensor, bad: torch.Tensor, chunk_of: torch.Tensor,
                layout: BucketLayout, nmsgs: int) -> None:
    """Majority vote only: byte M−1 of message r ← any non-finite block in chunk r."""
    flags = torch.zeros(nmsgs, dtype=torch.int32, device=msgs.device)
    if bad.numel():
        flags.index_add_(0, chunk_of, bad)
    idx = torch.arange(nmsgs, device=msgs.device) * layout.msg_nbytes + layout.flag_off
    msgs[idx] = (flags > 0).to(torch.uint8)


def _buffers(layout: BucketLayout, dev: torch.device, nmsgs: int) -> dict[str, torch.Tensor]:
    """Message buffers kept with the layout and reused every step. Bytes no block writes
    (message padding) are zeroed once and stay zero."""
    key = ("buffers", nmsgs, str(dev))
    if key not in layout.cache:
        M = layout.msg_nbytes
        u8 = dict(dtype=torch.uint8, device=dev)
        layout.cache[key] = {
            "send": torch.zeros(nmsgs * M, **u8), "recv": torch.zeros(nmsgs * M, **u8),
            "msg": torch.zeros(M, **u8), "gathered": torch.zeros(nmsgs * M, **u8),
            "owned": torch.zeros(layout.own_len, dtype=torch.float32, device=dev),
            "bad": torch.zeros(layout.nblocks, dtype=torch.int32, device=dev),
            "own_bad": torch.zeros(layout.own_blocks.shape[0], dtype=torch.int32, device=dev)}
    return layout.cache[key]


def _output(out: torch.Tensor | None, layout: BucketLayout) -> torch.Tensor:
    if out is None:
        out = torch.empty(layout.n, dtype=torch.float32, device=layout.all_blocks.device)
    return out


def compressed_reduce_scatter(spec: BlockSpec, x: torch.Tensor, layout: BucketLayout,
                              ctx: BucketContext, worker: torch.Tensor | None,
                              grad_scale: float = 1.0, vote: bool = False,
                              out: torch.Tensor | None = None) -> BucketWork:
    """Phase 1 of :func:`two_phase_allreduce` alone (steps 1-3): rank r ends with the average
    (or majority vote) of chunk r of ``x`` over ranks, written into ``out`` (``layout.own_len``
    values; a buffer of the layout's if None), which the generator returns. What FSDP's
    gradient reduce-scatter needs (:mod:`dqt.comm.fsdp`)."""
    N, M, dev = ctx.world, layout.msg_nbytes, x.device
    t0 = time.perf_counter()
    b = _buffers(layout, dev, N)
    send = b["send"]
    bad = b["bad"] if vote else None
    blockq.encode(spec, x, layout.all_blocks, send, worker, grad_scale, ctx.key(WORKER), bad,
                  impl=ctx.impl)
    if vote:
        _flag_bytes(send, bad, layout.block_chunk, layout, N)
    ctx.meter.add_time("compress", time.perf_counter() - t0)
    ctx.meter.record("all_to_all", send, N)
    recv = yield Request("all_to_all", send, b["recv"])
    t2 = time.perf_counter()
    owned = b["owned"] if out is None else out
    # vote: the peers' sum ("copy"), then its sign with ties broken by the owner's coin
    blockq.decode(spec, recv, layout.own_blocks, owned, npeers=N, peer_stride=M,
                  flag_off=layout.flag_off, mode="copy" if vote else "mean", impl=ctx.impl)
    if vote:
        majority_vote(owned, ctx.key(TIES))
    ctx.meter.add_time("decompress", time.perf_counter() - t2)
    return owned


def two_phase_allreduce(spec: BlockSpec, x: torch.Tensor, layout: BucketLayout,
                        ctx: BucketContext, worker: torch.Tensor | None,
                        server: torch.Tensor | None, grad_scale: float = 1.0,
                        vote: bool = False, out: torch.Tensor | None = None) -> BucketWork:
    """Average (or majority vote) of the fp32 bucket ``x`` over ranks, as a generator of the
    two collectives it needs (a runner carries them: :func:`run_sync`, or Horovod's). ``worker``
    / ``server`` are flat parameter-order residuals (updated in place) or None for no error
    feedback. ``out`` (may be ``x`` itself: it is read before it is written) receives the
    result, which the generator returns."""
    N, dev = ctx.world, x.device
    owned = yield from compressed_reduce_scatter(spec, x, layout, ctx, worker, grad_scale, vote)
    t3 = time.perf_counter()
    b = _buffers(layout, dev, N)
    msg = b["msg"]
    own_bad = b["own_bad"] if vote else None
    blockq.encode(spec, owned, layout.own_blocks, msg, server, grad_scale, ctx.key(SERVER),
                  own_bad, impl=ctx.impl)
    if vote:
        _flag_bytes(msg, own_bad, torch.zeros_like(layout.own_blocks[:, 0]), layout, 1)
    t4 = time.perf_counter()
    ctx.meter.record("all_gather", msg, N)
    gathered = yield Request("all_gather", msg, b["gathered"])
    t5 = time.perf_counter()
    out = _output(out, layout)
    blockq.decode(spec, gathered, layout.all_blocks, out, flag_off=layout.flag_off,
                  impl=ctx.impl)
    ctx.meter.add_time("compress", t4 - t3)
    ctx.meter.add_time("decompress", time.perf_counter() - t5)
    return out


def allgather_allreduce(spec: BlockSpec, x: torch.Tensor, layout: BucketLayout,
                        ctx: BucketContext, worker: torch.Tensor | None,
                        grad_scale: float = 1.0, vote: bool = False,
                        out: torch.Tensor | None = None) -> BucketWork:
    """Average of ``x`` through one ``all_gather`` of every rank's whole message (``layout``
    built with one chunk); a generator like :func:`two_phase_allreduce`."""
    N, M, dev = ctx.world, layout.msg_nbytes, x.device
    t0 = time.perf_counter()
    b = _buffers(layout, dev, N)
    msg = b["msg"]
    bad = b["bad"] if vote else None
    blockq.encode(spec, x, layout.all_blocks, msg, worker, grad_scale, ctx.key(WORKER), bad,
                  impl=ctx.impl)
    if vote:
        _flag_bytes(msg, bad, layout.block_chunk, layout, 1)
    ctx.meter.add_time("compress", time.perf_counter() - t0)
    ctx.meter.record("all_gather", msg, N)
    gathered = yield Request("all_gather", msg, b["gathered"])
    t2 = time.perf_counter()
    out = _output(out, layout)
    blockq.decode(spec, gathered, layout.all_blocks, out, npeers=N, peer_stride=M,
                  flag_off=layout.flag_off, mode="copy" if vote else "mean", impl=ctx.impl)
    if vote:  # every rank decides the ties alike: rank 0's key
        majority_vote(out, mix_seed(ctx.seed, ctx.step, 0, ctx.bucket, TIES))
    ctx.meter.add_time("decompress", time.perf_counter() - t2)
    return out

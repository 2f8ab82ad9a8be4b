"""Compressed all-reduce of one flat fp32 gradient bucket.

**two-phase** (default; bandwidth-optimal, the DeepSpeed/Bagua structure with one collective per
phase). The bucket of n values is zero-padded to N·c (c = ceil(n/N)) and cut into N chunks;
rank r owns chunk r.

1. compress every chunk (worker error feedback for biased schemes) → N messages of m bytes;
2. ``all_to_all_single``: rank r receives chunk r of every peer;
3. decode the N messages and sum in fp32; average (÷N), or for ``signsgd`` take the majority
   vote sign(Σ signs);
4. re-compress the owned chunk (server error feedback for biased schemes);
5. ``all_gather_into_tensor`` the N owned chunks; every rank decodes the *same* bytes with the
   same code, so the averaged gradient is bitwise identical on all ranks (invariant 1).

Bytes per rank: (N−1)/N·N·m + (N−1)·m = 2(N−1)·m ≈ 2(N−1)/N × the packed bucket size.

**allgather** (for comparison; what PyTorch's quantization hooks and GRACE do): every rank
compresses the whole bucket, ``all_gather`` → decode all N → average. (N−1)·N·m bytes: O(N).

Scales travel inside each message (see :mod:`dqt.comm.compressors`), so each phase is one
collective. Stochastic rounding is seeded from (seed, step, rank, bucket, chunk, phase).
Majority vote (signsgd) messages carry one trailing flag byte for non-finite chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dqt.comm.compressors import Compressor, mix_seed
from dqt.comm.meter import CommMeter

WORKER, SERVER = 0, 1


@dataclass
class BucketContext:
    """What one call needs besides the data: who/when (for seeds) and where to account."""

    group: dist.ProcessGroup
    rank: int
    world: int
    seed: int
    step: int
    bucket: int
    meter: CommMeter


def _seed(ctx: BucketContext, rank: int, chunk: int, phase: int) -> int:
    return mix_seed(ctx.seed, ctx.step, rank, ctx.bucket, chunk, phase)


def _flagged(buf: torch.Tensor, x: torch.Tensor, flag: bool) -> torch.Tensor:
    """Majority vote only: sign bits cannot carry inf/nan, so each message gets a trailing byte,
    1 if its chunk held a non-finite value (decoded as NaN, so GradScaler skips the step)."""
    if not flag:
        return buf
    bad = (~torch.isfinite(x).all()).to(torch.uint8).reshape(1)
    return torch.cat([buf, bad])


def _encode_chunks(comp: Compressor, v: torch.Tensor, c: int, ctx: BucketContext,
                   want_decoded: bool, flag: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    bufs, decoded = [], []
    for i in range(v.numel() // c):
        x = v[i * c:(i + 1) * c]
        seed = _seed(ctx, ctx.rank, i, WORKER)
        if want_decoded:
            buf, d = comp.encode_decode(x, seed)
            decoded.append(d)
        else:
            buf = comp.encode(x, seed)
        bufs.append(_flagged(buf, x, flag))
    return torch.cat(bufs), (torch.cat(decoded) if want_decoded else None)


def _decode_all(comp: Compressor, msgs: torch.Tensor, count: int, c: int,
                flag: bool = False) -> list[torch.Tensor]:
    m = msgs.numel() // count
    out = []
    for i in range(count):
        msg = msgs[i * m:(i + 1) * m]
        d = comp.decode(msg[:-1] if flag else msg, c)
        out.append(torch.where(msg[-1] > 0, torch.nan, d) if flag else d)
    return out


def _all_gather(msg: torch.Tensor, ctx: BucketContext) -> torch.Tensor:
    """Every rank's message, rank order, counted on the meter."""
    gathered = torch.empty(ctx.world * msg.numel(), dtype=torch.uint8, device=msg.device)
    dist.all_gather_into_tensor(gathered, msg, group=ctx.group)
    ctx.meter.record("all_gather", msg, ctx.world)
    return gathered


def two_phase_allreduce(comp: Compressor, v: torch.Tensor, ctx: BucketContext,
                        worker_ef: bool, server_residual: torch.Tensor | None,
                        majority_vote: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """All-reduce (average) of ``v`` (fp32, (n,), residual already added).

    Returns (averaged gradient (n,), locally decoded message for worker EF or None,
    new server residual of the owned chunk or None)."""
    n, N = v.numel(), ctx.world
    c = -(-n // N)
    t0 = time.perf_counter()
    padded = torch.zeros(N * c, dtype=torch.float32, device=v.device)
    padded[:n] = v
    send, local = _encode_chunks(comp, padded, c, ctx, want_decoded=worker_ef,
                                 flag=majority_vote)
    t1 = time.perf_counter()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=ctx.group)
    ctx.meter.record("all_to_all", send, N)
    t2 = time.perf_counter()
    parts = _decode_all(comp, recv, N, c, flag=majority_vote)
    total = torch.stack(parts).sum(0)
    owned = torch.where(total >= 0, 1.0, -1.0) if majority_vote else total / N
    new_server = None
    if server_residual is not None:
        w = owned + server_residual
        msg, d = comp.encode_decode(w, _seed(ctx, ctx.rank, ctx.rank, SERVER))
        new_server = w - d
    else:
        msg = comp.encode(owned, _seed(ctx, ctx.rank, ctx.rank, SERVER))
    if majority_vote:
        msg = _flagged(msg, total, True)
    t3 = time.perf_counter()
    gathered = _all_gather(msg, ctx)
    t4 = time.perf_counter()
    out = torch.cat(_decode_all(comp, gathered, N, c, flag=majority_vote))[:n]
    t5 = time.perf_counter()
    ctx.meter.add_time("compress", (t1 - t0) + (t3 - t2) * 0.5)
    ctx.meter.add_time("communicate", (t2 - t1) + (t4 - t3))
    ctx.meter.add_time("decompress", (t3 - t2) * 0.5 + (t5 - t4))
    return out, (local[:n] if local is not None else None), new_server


def allgather_allreduce(comp: Compressor, v: torch.Tensor, ctx: BucketContext, worker_ef: bool,
                        majority_vote: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average of ``v`` over ranks through one ``all_gather`` of every rank's whole message."""
    n, N = v.numel(), ctx.world
    t0 = time.perf_counter()
    seed = _seed(ctx, ctx.rank, 0, WORKER)
    if worker_ef:
        msg, local = comp.encode_decode(v, seed)
    else:
        msg, local = comp.encode(v, seed), None
    msg = _flagged(msg, v, majority_vote)
    t1 = time.perf_counter()
    gathered = _all_gather(msg, ctx)
    t2 = time.perf_counter()
    total = torch.stack(_decode_all(comp, gathered, N, n, flag=majority_vote)).sum(0)
    out = torch.where(total >= 0, 1.0, -1.0) if majority_vote else total / N
    ctx.meter.add_time("compress", t1 - t0)
    ctx.meter.add_time("communicate", t2 - t1)
    ctx.meter.add_time("decompress", time.perf_counter() - t2)
    return out, local

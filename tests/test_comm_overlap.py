"""The non-blocking DDP hook (``scheme.overlap``, :mod:`dqt.comm.overlap`) on real gloo groups.

* the same gradients and residuals, bitwise, as the inline hook, on every rank, with several
  buckets, for every codec, on 2 and 3 ranks;
* the hook returns before its bucket's exchange is done: a peer that starts its backward a
  second late leaves the first bucket's future pending (the inline hook's is always done);
* 200 steps with 6 buckets on 2 and 3 ranks: no deadlock (every collective is bounded by the
  group's timeout), every step's gradients equal on every rank;
* a peer that dies mid-training surfaces on the survivor as an error raised by ``backward``,
  not a hang.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dqt.comm import build_scheme
from dqt.comm.config import SCHEME_CONFIGS
from tests.conftest import rank_process

TESTED = ("onebit", "signsgd", "ef_signsgd", "ternary_grad", "qsgd")
TIMEOUT = datetime.timedelta(seconds=60)  # a deadlock fails the test instead of hanging it


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for i in range(6):
        layers += [nn.Linear(48, 48), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(48, 5))


def _buckets(model: DDP) -> int:
    return len(model.reducer._get_zeros_like_grad_buckets())


def _step(model: DDP, rank: int, step: int, lr: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(16, 48, generator=g), torch.randint(0, 5, (16,), generator=g)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return grads


def _ddp(name: str, overlap: bool, seen: list | None = None) -> tuple[DDP, object]:
    """A DDP model with the scheme attached; ``seen`` collects ``future.done()`` as each hook
    call returns."""
    model = DDP(_model(), bucket_cap_mb=0.005)  # 6 buckets: one per hidden layer
    cfg = SCHEME_CONFIGS[name](warmup_steps=1, min_bucket_numel=64, block_size=128,
                               overlap=overlap)
    scheme = build_scheme(cfg)
    if seen is not None:
        hook = scheme._hook

        def watched(state, bucket):
            fut = hook(state, bucket)
            seen.append(fut.done())
            return fut

        scheme._hook = watched  # what attach registers
    scheme.attach(model)
    return model, scheme


@rank_process
def _same_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    results = {}
    for name in TESTED:
        for overlap in (False, True):
            model, scheme = _ddp(name, overlap)
            grads = [_step(model, rank, s) for s in range(5)]
            results[name, overlap] = {"grads": grads, "state": scheme.state_dict(),
                                      "buckets": _buckets(model)}
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3])
def same_runs(request, tmp_path_factory):
    world, tmp = request.param, tmp_path_factory.mktemp(f"overlap{request.param}")
    mp.spawn(_same_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("name", TESTED)
def test_overlap_is_bitwise_the_inline_hook(same_runs, name):
    for r, res in enumerate(same_runs):
        inline, overlap = res[name, False], res[name, True]
        assert overlap["buckets"] >= 4
        for step, (a, b) in enumerate(zip(inline["grads"], overlap["grads"])):
            assert torch.equal(a, b), f"rank {r} step {step}: overlap differs from inline"
            assert torch.equal(b, same_runs[0][name, True]["grads"][step]), \
                f"rank {r} step {step}: ranks differ"
        for key, value in inline["state"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, overlap["state"][key]), f"rank {r}: {key}"
            else:
                assert value == overlap["state"][key], f"rank {r}: {key}"


@rank_process
def _pending_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    done = {}
    for overlap in (False, True):
        seen: list[bool] = []
        model, scheme = _ddp("ternary_grad", overlap, seen)
        for s in range(3):  # warm-up, bucket rebuild, compressed
            _step(model, rank, s)
        seen.clear()
        dist.barrier()
        if rank == 1:
            time.sleep(1.0)  # rank 0's first bucket cannot complete while its hook runs
        _step(model, rank, 3)
        done[overlap] = list(seen)
    torch.save(done, f"{out}/rank{rank}.pt")


def test_hook_returns_before_the_exchange_completes(tmp_path):
    mp.spawn(_pending_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
             join=True)
    done = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert len(done[True]) >= 4 and len(done[False]) == len(done[True])
    assert all(done[False]), "the inline hook returns a completed future"
    assert done[True][0] is False, "the first bucket's future must still be pending"


@rank_process
def _stress_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    model, scheme = _ddp("onebit", True)
    digests = []
    for s in range(200):
        grads = _step(model, rank, s, lr=0.01)
        digests.append(grads.double().mul(torch.arange(1, grads.numel() + 1,
                                                       dtype=torch.float64)).sum().item())
    torch.save({"digests": digests, "buckets": _buckets(model),
                "finite": all(map(lambda d: d == d, digests))}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_200_steps_with_6_buckets_do_not_deadlock(world, tmp_path):
    mp.spawn(_stress_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
             nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert ranks[0]["buckets"] >= 6
    assert len(ranks[0]["digests"]) == 200 and ranks[0]["finite"]
    for r in ranks[1:]:
        assert r["digests"] == ranks[0]["digests"], "ranks' gradients differ"


def _dying_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    model, scheme = _ddp("ternary_grad", True)
    for s in range(3):
        _step(model, rank, s)
    if rank == 1:
        os._exit(0)  # dies between steps, its sockets closed by the OS
    t0 = time.perf_counter()
    try:
        _step(model, rank, 3)
        error = None
    except Exception as e:  # noqa: BLE001 - what the user sees
        error = f"{type(e).__name__}: {e}"
    with open(f"{out}/rank0.txt", "w") as f:
        f.write(f"{time.perf_counter() - t0:.1f}\n{error}")
    os._exit(0)


def test_a_dead_peer_is_an_error_not_a_hang(tmp_path):
    mp.spawn(_dying_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
             join=True)
    seconds, error = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "scheme ternary_grad: a bucket's exchange failed on this rank" in error, error
    assert float(seconds) < TIMEOUT.total_seconds() + 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_cuda_overlap_matches_inline(tmp_path):
    """One GPU, a world-size-1 NCCL group: the thread's side stream and the device future give
    the inline hook's gradients (the plain path: one rank has nothing to compress)."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        grads = {}
        for overlap in (False, True):
            torch.manual_seed(0)
            model = DDP(_model().cuda(), device_ids=[0], bucket_cap_mb=0.005)
            scheme = build_scheme(SCHEME_CONFIGS["ternary_grad"](overlap=overlap))
            scheme.attach(model)
            out = []
            for s in range(3):
                g = torch.Generator().manual_seed(s)
                x, y = torch.randn(16, 48, generator=g), torch.randint(0, 5, (16,), generator=g)
                model.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
                out.append(torch.cat([p.grad.flatten() for p in model.parameters()]).cpu())
            grads[overlap] = out
        for a, b in zip(grads[False], grads[True]):
            assert torch.equal(a, b)
    finally:
        dist.destroy_process_group()

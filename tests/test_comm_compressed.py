"""dqt's compressed all-reduce on real gloo groups of 2, 3 and 4 ranks.

* the two-phase collective equals a single-process simulation of its two phases built from the
  layout and the reference kernels alone (the reference average of the decoded contributions),
  on every rank, bitwise, for buckets the world size does not divide, with error feedback;
  bytes = 2(N−1)·M; the allgather mode likewise;
* the DDP hook: identical gradients on every rank, warm-up and small buckets uncompressed,
  non-finite gradients reach every rank and leave the residuals of their blocks untouched,
  state round-trips.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dqt.comm import build_scheme
from dqt.comm.collective import (SERVER, TIES, WORKER, BucketContext, allgather_allreduce,
                                 majority_vote, run_sync, two_phase_allreduce)
from dqt.comm.compressors import build_compressor
from dqt.comm.layout import ParamSlot, build_layout
from dqt.comm.meter import CommMeter
from dqt.comm.config import SCHEME_CONFIGS
from dqt.kernels import blockq
from dqt.kernels.philox import mix_seed
from tests.cases import CODECS, HOOK
from tests.conftest import rank_process
from dqt.train.distributed import teardown

SEED, STEP, BUCKET = 7, 3, 1
# the DDP hook tests below: presets, and variants (case id -> scheme name, options)
TESTED = ("onebit", "signsgd", "ef_signsgd", "ternary_grad", "qsgd", "fp8", "fp8/ef")
VARIANT_OPTIONS = {"fp8/ef": ("fp8", {"error_feedback": True})}
VARIANTS = HOOK  # case ids of tests/cases.py
# a bucket of five parameters (flat offsets in a bigger model), in DDP's (reverse) order
SIZES = [517, 3, 1000, 64, 77]
FLAT = [10, 600, 700, 1800, 1900]


def _slots() -> list[ParamSlot]:
    slots, pos = [], 0
    for i in reversed(range(len(SIZES))):  # the bucket buffer holds the last parameter first
        slots.append(ParamSlot(FLAT[i], pos, SIZES[i]))
        pos += SIZES[i]
    return slots


def _compressor(variant: str):
    name, options = CODECS[variant]
    return build_compressor(name, **{**options, "block_size": 64})


def _input(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1000 + rank))


def _residual(rank: int) -> torch.Tensor:
    return 0.01 * torch.randn(2000, generator=torch.Generator().manual_seed(2000 + rank))


@rank_process
def _collective_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    n = sum(SIZES)
    results = {}
    for variant in VARIANTS:
        comp = _compressor(variant)
        ef = comp.biased and not comp.vote
        for mode in ("two_phase", "allgather"):
            meter = CommMeter()
            ctx = BucketContext(rank, world, SEED, STEP, BUCKET, meter, "auto")
            layout = build_layout(_slots(), world if mode == "two_phase" else 1, rank, comp.spec,
                                  flag=comp.vote)
            worker = _residual(rank) if ef else None
            server = _residual(100 + rank) if ef else None
            if mode == "two_phase":
                work = two_phase_allreduce(comp.spec, _input(rank, n), layout, ctx, worker,
                                           server, 2.0, comp.vote)
            else:
                work = allgather_allreduce(comp.spec, _input(rank, n), layout, ctx, worker, 2.0,
                                           comp.vote)
            got = run_sync(work, dist.group.WORLD, meter)
            results[(variant, mode)] = {"out": got, "stats": meter.pop(), "worker": worker,
                                        "server": server, "M": layout.msg_nbytes}
    torch.save(results, f"{out}/rank{rank}.pt")


def _simulate(variant: str, world: int) -> tuple[torch.Tensor, list[Any], list[Any]]:
    """Both phases in one process from the layout, the reference kernels and the documented
    keys: (average in bucket order, worker residuals, server residuals) per rank."""
    comp, n = _compressor(variant), sum(SIZES)
    ef = comp.biased and not comp.vote
    lays = [build_layout(_slots(), world, r, comp.spec, flag=comp.vote) for r in range(world)]
    M = lays[0].msg_nbytes
    sends, workers, servers = [], [], []
    for r in range(world):
        send = torch.zeros(world * M, dtype=torch.uint8)
        w = _residual(r) if ef else None
        bad = torch.zeros(lays[r].nblocks, dtype=torch.int32)
        blockq.encode(comp.spec, _input(r, n), lays[r].all_blocks, send, w, 2.0,
                      mix_seed(SEED, STEP, r, BUCKET, WORKER), bad, impl="reference")
        sends.append(send)
        workers.append(w)
    finals = []
    for r in range(world):  # owner r: chunk r of every peer, in peer order
        recv = torch.cat([sends[p][r * M:(r + 1) * M] for p in range(world)])
        owned = torch.empty(lays[r].own_len)
        blockq.decode(comp.spec, recv, lays[r].own_blocks, owned, npeers=world, peer_stride=M,
                      flag_off=lays[r].flag_off, mode="copy" if comp.vote else "mean",
                      impl="reference")
        if comp.vote:  # the documented rule: sign of the sum, a tie → the owner's coin
            majority_vote(owned, mix_seed(SEED, STEP, r, BUCKET, TIES))
        msg = torch.zeros(M, dtype=torch.uint8)
        s = _residual(100 + r) if ef else None
        blockq.encode(comp.spec, owned, lays[r].own_blocks, msg, s, 2.0,
                      mix_seed(SEED, STEP, r, BUCKET, SERVER), impl="reference")
        finals.append(msg)
        servers.append(s)
    out = torch.empty(n)
    blockq.decode(comp.spec, torch.cat(finals), lays[0].all_blocks, out,
                  flag_off=lays[0].flag_off, impl="reference")
    return out, workers, servers


@pytest.mark.parametrize("world", [2, 3, 4])
def test_two_phase_equals_simulation_on_every_rank(world, tmp_path):
    mp.spawn(_collective_worker, args=(world, str(tmp_path / "store"), str(tmp_path)),
             nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for variant in VARIANTS:
        expected, workers, servers = _simulate(variant, world)
        for r in range(world):
            res = ranks[r][(variant, "two_phase")]
            assert torch.equal(res["out"], ranks[0][(variant, "two_phase")]["out"]), \
                f"{variant}: rank {r} differs"
            assert torch.equal(res["out"], expected), f"{variant} != simulated two-phase average"
            if workers[r] is not None:
                assert torch.equal(res["worker"], workers[r]) and torch.equal(res["server"], servers[r])
        M = ranks[0][(variant, "two_phase")]["M"]
        assert ranks[0][(variant, "two_phase")]["stats"]["comm/bytes_sent"] == 2 * (world - 1) * M
        # allgather mode: every rank decodes the same N messages; O(N) bytes
        ag = [ranks[r][(variant, "allgather")] for r in range(world)]
        assert all(torch.equal(a["out"], ag[0]["out"]) for a in ag)
        assert ag[0]["stats"]["comm/bytes_sent"] == (world - 1) * ag[0]["M"]


def test_two_phase_average_error_shrinks_with_bits():
    errs = {}
    n = sum(SIZES)
    exact = torch.stack([_input(r, n) for r in range(4)]).mean(0)
    for bits in (2, 4, 8):
        errs[bits] = float((_simulate(f"qsgd/{bits}", 4)[0] - exact).norm() / exact.norm())
    assert errs[8] < errs[4] < errs[2] and errs[8] < 0.05


# ---------------------------------------------------------------- the DDP hook
def _cfg(name: str, **kw: Any):
    """The shipped preset of ``name`` (error feedback on for onebit and ef_signsgd), or the
    variant of that id in VARIANT_OPTIONS."""
    name, options = VARIANT_OPTIONS.get(name, (name, {}))
    return SCHEME_CONFIGS[name](**options, **kw)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(31, 64), nn.ReLU(), nn.Linear(64, 47), nn.ReLU(),
                         nn.Linear(47, 5))


def _backward(model: DDP, rank: int, step: int) -> torch.Tensor:
    """One step's gradients (after the hook) of a seeded per-rank batch, flattened."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(16, 31, generator=g), torch.randint(0, 5, (16,), generator=g)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@rank_process
def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name in TESTED:
        model = DDP(_model(), bucket_cap_mb=0.008)  # several buckets
        scheme = build_scheme(_cfg(name, warmup_steps=1, min_bucket_numel=64, block_size=128))
        scheme.attach(model)
        steps = []
        for step in range(4):
            grads = _backward(model, rank, step)
            steps.append({"grads": grads.clone(), "stats": scheme.stats()})
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        # a non-finite gradient on rank 1 only: every rank must see it; rank 1's residuals
        # (every block non-finite there) and the server residuals stay as they were
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                  for k, v in scheme.state_dict().items()}
        model.zero_grad(set_to_none=True)
        loss = model(torch.randn(4, 31)).sum()
        (loss * (float("inf") if rank == 1 else 1.0)).backward()
        inf_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[name] = {"steps": steps, "state": scheme.state_dict(), "before_inf": before,
                         "inf_grads": inf_grads}
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3])
def ddp_runs(request, tmp_path_factory):
    world, tmp = request.param, tmp_path_factory.mktemp(f"ddp{request.param}")
    mp.spawn(_ddp_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("name", TESTED)
def test_hook_gives_identical_gradients_on_every_rank(ddp_runs, name):
    world, ranks = ddp_runs
    for step in range(4):
        grads = [r[name]["steps"][step]["grads"] for r in ranks]
        for g in grads[1:]:
            assert torch.equal(grads[0], g), f"{name} step {step}: ranks differ"
        assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("name", TESTED)
def test_hook_warmup_then_compressed(ddp_runs, name):
    world, ranks = ddp_runs
    stats = [s["stats"] for s in ranks[0][name]["steps"]]
    assert stats[0]["comm/bytes_sent"] == stats[0]["comm/bytes_raw"]  # warm-up: plain fp32
    for s in stats[1:]:
        assert 0 < s["comm/bytes_sent"] < s["comm/bytes_raw"] / 3
        for key in ("time/compress_ms", "time/communicate_ms", "time/decompress_ms"):
            assert key in s


@pytest.mark.parametrize("name", TESTED)
def test_non_finite_gradient_reaches_every_rank_and_spares_its_residuals(ddp_runs, name):
    world, ranks = ddp_runs
    for r, res in enumerate(ranks):
        assert not torch.isfinite(res[name]["inf_grads"]).all(), "inf must reach every rank"
        state, before = res[name]["state"], res[name]["before_inf"]
        for key in ("worker_residual", "server_residual"):
            if before[key] is None:
                continue
            assert torch.isfinite(state[key]).all(), f"{key} polluted by inf"
            if key == "server_residual" or r == 1:
                assert torch.equal(state[key], before[key]), f"rank {r}: {key} was updated"


@pytest.mark.parametrize("name", TESTED)
def test_residual_state_is_per_rank_and_round_trips(ddp_runs, name):
    world, ranks = ddp_runs
    state = ranks[0][name]["state"]
    if state["worker_residual"] is None:
        assert name in ("signsgd", "ternary_grad", "qsgd", "fp8")
        return
    n_params = sum(p.numel() for p in _model().parameters())
    assert state["worker_residual"].shape == (n_params,)  # flat, in parameter order
    assert state["worker_residual"].abs().sum() > 0
    assert not torch.equal(state["worker_residual"], ranks[1][name]["state"]["worker_residual"])
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fresh = build_scheme(_cfg(name))
        fresh.attach(DDP(_model()))
        fresh.load_state_dict(state)
        again = fresh.state_dict()
        assert again["step"] == state["step"]
        assert torch.equal(again["worker_residual"], state["worker_residual"])
    finally:
        teardown(barrier=True)



# ---------------------------------------------------------------- scheme.auto
@rank_process
def _auto_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for margin in (1e-9, 1e9):  # compressed always wins / always loses the timing
        model = DDP(_model(), bucket_cap_mb=0.008)
        scheme = build_scheme(_cfg("onebit", min_bucket_numel=64, block_size=128, auto=True,
                                   auto_trials=2, auto_margin=margin))
        scheme.attach(model)
        steps = [{"grads": _backward(model, rank, step), "stats": scheme.stats()}
                 for step in range(4)]
        results[margin] = {"steps": steps, "choice": dict(scheme.auto_choice),
                           "state": scheme.state_dict()}
    torch.save(results, f"{out}/rank{rank}.pt")


def test_auto_keeps_the_faster_path_on_every_rank(tmp_path):
    world = 2
    mp.spawn(_auto_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for margin, compress in ((1e-9, True), (1e9, False)):
        choices = [r[margin]["choice"] for r in ranks]
        assert choices[0] == choices[1] and choices[0], "the same choice on every rank"
        assert set(choices[0].values()) == {compress}
        assert ranks[0][margin]["state"]["auto_choice"] == choices[0]  # checkpointed
        stats = [s["stats"] for s in ranks[0][margin]["steps"]]
        # trial steps send both the compressed messages and a plain all-reduce
        assert stats[0]["comm/bytes_sent"] > stats[0]["comm/bytes_raw"]
        if compress:  # then only the compressed messages
            assert 0 < stats[3]["comm/bytes_sent"] < stats[3]["comm/bytes_raw"] / 3
        else:  # then only the plain all-reduce
            assert stats[3]["comm/bytes_sent"] == stats[3]["comm/bytes_raw"]
        for step in range(4):
            assert torch.equal(ranks[0][margin]["steps"][step]["grads"],
                               ranks[1][margin]["steps"][step]["grads"])


# ---------------------------------------------------------------- majority vote ties
@rank_process
def _vote_worker(rank: int, world: int, store: str, out: str) -> None:
    """signSGD's two-phase vote of zero-mean noise, 20 steps of 2**14 values per rank."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    comp = build_compressor("signsgd", block_size=2048)
    slots = [ParamSlot(0, 0, 1 << 14)]
    layout = build_layout(slots, world, rank, comp.spec, flag=True)
    votes, ties = [], []
    for step in range(20):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(1 << 14, generator=g)
        signs = torch.where(x >= 0, 1.0, -1.0)
        total = torch.zeros_like(signs)
        dist.all_reduce(total.add_(signs))  # the exact Σ signs, to count the ties
        ctx = BucketContext(rank, world, 0, step, 0, CommMeter(), "auto")
        vote = run_sync(two_phase_allreduce(comp.spec, x.clone(), layout, ctx, None, None,
                                            1.0, True), dist.group.WORLD, ctx.meter)
        votes.append(vote)
        ties.append(float((total == 0).float().mean()))
    torch.save({"votes": torch.stack(votes), "ties": ties}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 4])
def test_the_mean_vote_of_zero_mean_noise_is_unbiased(world, tmp_path):
    """Ties (Σ signs = 0: 50 % of the values at N = 2, 37.5 % at N = 4) are broken by a fair
    coin: the mean vote over 20 × 2**14 values is 0 within 4 standard errors (the votes are
    ±1, so the standard error is 1/√(327,680) ≈ 0.0017; with sign(0) = +1 it was +0.5 at N = 2
    and +0.375 at N = 4), and every rank holds the same votes."""
    mp.spawn(_vote_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    votes = ranks[0]["votes"]
    assert all(torch.equal(r["votes"], votes) for r in ranks[1:]), "ranks' votes differ"
    assert set(votes.unique().tolist()) == {-1.0, 1.0}
    expected_ties = {2: 0.5, 4: 0.375}[world]
    assert abs(sum(ranks[0]["ties"]) / 20 - expected_ties) < 0.01
    assert abs(float(votes.mean())) < 4 / math.sqrt(votes.numel()), float(votes.mean())

"""dqt's compressed all-reduce on real gloo groups of 2, 3 and 4 ranks.

* the two-phase collective equals a single-process simulation of its two phases built from
  the compressor alone (the reference average of the decoded contributions), on every rank,
  bitwise, for bucket sizes the world size does not divide; bytes = 2(N−1)·message size;
* the DDP hook: identical gradients on every rank, warm-up and small buckets uncompressed,
  non-finite buckets propagate without touching the residuals, state round-trips.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dqt.comm import build_scheme
from dqt.comm.collective import SERVER, WORKER, BucketContext, two_phase_allreduce
from dqt.comm.compressors import build_compressor, mix_seed
from dqt.comm.meter import CommMeter
from dqt.config import CompressedSchemeConfig, QSGDConfig, TernaryGradConfig

SEED, STEP, BUCKET = 7, 3, 1
TESTED = ("onebit", "signsgd", "ef_signsgd", "ternary_grad", "qsgd")  # the DDP hook tests below
VARIANTS: dict[str, dict[str, Any]] = {
    "onebit": {}, "signsgd": {}, "ef_signsgd": {}, "ternary_grad": {},
    "ternary_grad/base3": {"format": "base3"}, "qsgd": {"bits": 4}, "qsgd/2": {"bits": 2},
    "qsgd/8": {"bits": 8},
}


def _compressor(variant: str):
    return build_compressor(variant.split("/")[0], block_size=64, **VARIANTS[variant])


def _input(rank: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1000 + rank))


def _collective_worker(rank: int, world: int, store: str, n: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for variant in VARIANTS:
        comp = _compressor(variant)
        meter = CommMeter()
        ctx = BucketContext(dist.group.WORLD, rank, world, SEED, STEP, BUCKET, meter)
        c = -(-n // world)
        server = torch.zeros(c) if comp.biased and variant != "signsgd" else None
        got, _, _ = two_phase_allreduce(comp, _input(rank, n), ctx, worker_ef=comp.biased,
                                        server_residual=server,
                                        majority_vote=variant == "signsgd")
        results[variant] = {"out": got, "stats": meter.pop()}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _simulate(variant: str, n: int, world: int) -> torch.Tensor:
    """Both phases in one process, from the compressor and the documented seeds alone."""
    comp, c = _compressor(variant), -(-n // world)
    vote = variant == "signsgd"
    msgs = []
    for r in range(world):
        v = torch.zeros(world * c)
        v[:n] = _input(r, n)
        msgs.append([comp.encode(v[i * c:(i + 1) * c], mix_seed(SEED, STEP, r, BUCKET, i, WORKER))
                     for i in range(world)])
    owned_msgs = []
    for r in range(world):
        total = torch.stack([comp.decode(msgs[p][r], c) for p in range(world)]).sum(0)
        owned = torch.where(total >= 0, 1.0, -1.0) if vote else total / world
        owned_msgs.append(comp.encode(owned, mix_seed(SEED, STEP, r, BUCKET, r, SERVER)))
    return torch.cat([comp.decode(m, c) for m in owned_msgs])[:n]


def _message_bytes(variant: str, c: int) -> int:
    return _compressor(variant).wire_nbytes(c) + (variant == "signsgd")  # + vote flag byte


@pytest.mark.parametrize("world", [2, 3, 4])
def test_two_phase_equals_simulation_on_every_rank(world, tmp_path):
    n = 517 * world + 13  # not divisible by the world size, the block size or 8
    mp.spawn(_collective_worker, args=(world, str(tmp_path / "store"), n, str(tmp_path)),
             nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for variant in VARIANTS:
        expected = _simulate(variant, n, world)
        for r in range(world):
            got = ranks[r][variant]["out"]
            assert torch.equal(got, ranks[0][variant]["out"]), f"{variant}: rank {r} differs"
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6,
                                       msg=f"{variant} != simulated two-phase average")
        m = _message_bytes(variant, -(-n // world))
        assert ranks[0][variant]["stats"]["comm/bytes_sent"] == 2 * (world - 1) * m


def test_two_phase_average_is_close_to_the_true_average():
    """Sanity of the maths without processes: more bits, smaller error."""
    n, world = 4096, 4
    exact = torch.stack([_input(r, n) for r in range(world)]).mean(0)
    errs = {v: ((_simulate(v, n, world) - exact).norm() / exact.norm()).item()
            for v in ("qsgd/2", "qsgd", "qsgd/8")}
    assert errs["qsgd/8"] < errs["qsgd"] < errs["qsgd/2"]
    assert errs["qsgd/8"] < 0.05


# ---------------------------------------------------------------- the DDP hook
def _cfg(name: str, **kw: Any):
    if name == "ternary_grad":
        return TernaryGradConfig(**kw)
    if name == "qsgd":
        return QSGDConfig(**kw)
    return CompressedSchemeConfig(name=name, error_feedback=name in ("onebit", "ef_signsgd"), **kw)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(31, 64), nn.ReLU(), nn.Linear(64, 47), nn.ReLU(),
                         nn.Linear(47, 5))


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for name in TESTED:
        model = DDP(_model(), bucket_cap_mb=0.008)  # several buckets
        scheme = build_scheme(_cfg(name, warmup_steps=1, min_bucket_numel=64, block_size=128))
        scheme.attach(model)
        steps = []
        for step in range(4):
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(16, 31, generator=g), torch.randint(0, 5, (16,), generator=g)
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            steps.append({"grads": grads.clone(), "stats": scheme.stats()})
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
        # a non-finite gradient on rank 1 only: every rank must see it, residuals untouched
        before = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                  for k, v in scheme.state_dict().items()}
        model.zero_grad(set_to_none=True)
        loss = model(torch.randn(4, 31)).sum()
        (loss * (float("inf") if rank == 1 else 1.0)).backward()
        inf_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[name] = {"steps": steps, "state": scheme.state_dict(), "before_inf": before,
                         "inf_grads": inf_grads}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


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
def test_non_finite_bucket_propagates_and_spares_the_residuals(ddp_runs, name):
    world, ranks = ddp_runs
    for r in ranks:
        assert not torch.isfinite(r[name]["inf_grads"]).all(), "inf must reach every rank"
        state, before = r[name]["state"], r[name]["before_inf"]
        for key in ("worker_residual", "server_residual"):
            if before[key] is not None:
                assert torch.equal(state[key], before[key]), f"{key} polluted by inf"


@pytest.mark.parametrize("name", TESTED)
def test_residual_state_is_per_rank_and_round_trips(ddp_runs, name):
    world, ranks = ddp_runs
    state = ranks[0][name]["state"]
    if state["worker_residual"] is None:
        assert name in ("signsgd", "ternary_grad", "qsgd")
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
        dist.destroy_process_group()

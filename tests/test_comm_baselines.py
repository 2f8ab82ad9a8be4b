"""Every registered scheme on real gloo process groups (2 and 3 ranks): identical averaged
gradients on every rank, agreement with the plain average, exact byte accounting, and per-rank
state that survives a state_dict round trip. A scheme registered without settings in CASES
fails here (composer-style: new schemes must bring tests)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dqt.comm import build_scheme, scheme_names, wire_bytes
from dqt.comm.config import BF16Config, FP16Config, PowerSGDConfig
import dqt.comm.torch_hooks  # noqa: F401
from tests.conftest import rank_process
from dqt.train.distributed import teardown

STEPS = 4
# scheme -> (config or None, max relative error of the averaged grad vs the exact average,
#            expected bytes_sent / bytes_raw, or None when data-dependent)
CASES: dict[str, tuple[Any, float, float | None]] = {
    "allreduce": (None, 1e-6, 1.0),
    "fp16": (FP16Config(), 2e-3, 0.5),
    "bf16": (BF16Config(), 1e-2, 0.5),
    "powersgd": (PowerSGDConfig(start_powerSGD_iter=2), None, None),
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 37), nn.ReLU(), nn.Linear(37, 29), nn.ReLU(),
                         nn.Linear(29, 5))


@rank_process
def _worker(rank: int, world: int, store_path: str, name: str, out: str) -> None:  # noqa: C901
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world)
    model = DDP(_model(), bucket_cap_mb=0.002)  # several buckets
    reference = _model()
    scheme = build_scheme(CASES[name][0])
    scheme.attach(model)
    records = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + rank)
        x, y = torch.randn(8, 13, generator=g), torch.randint(0, 5, (8,), generator=g)
        model.zero_grad(set_to_none=True)
        reference.load_state_dict(model.module.state_dict())
        reference.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(reference(x), y).backward()
        local = torch.cat([p.grad.flatten() for p in reference.parameters()])
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        records.append({"avg": torch.cat([p.grad.flatten() for p in model.parameters()]),
                        "exact": torch.stack(gathered).mean(0), "stats": scheme.stats(),
                        "numel": local.numel()})
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
    torch.save({"records": records, "state": scheme.state_dict()}, f"{out}/rank{rank}.pt")


def _run(name: str, world: int, tmp_path) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), name, str(tmp_path)), nprocs=world,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_every_registered_scheme_has_test_settings():
    from tests.test_comm_compressed import TESTED as COMPRESSED

    missing = set(scheme_names()) - set(CASES) - set(COMPRESSED)
    assert not missing, (f"schemes without multi-process tests: {sorted(missing)}; add them to "
                         "CASES here or TESTED in test_comm_compressed.py")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_scheme_on_gloo(name, world, tmp_path):
    _, tol, byte_ratio = CASES[name]
    ranks = _run(name, world, tmp_path)
    for step in range(STEPS):
        avgs = [r["records"][step]["avg"] for r in ranks]
        for other in avgs[1:]:  # docs/design.md invariant 1: bitwise identical on every rank
            assert torch.equal(avgs[0], other), f"step {step}: ranks disagree"
        rec = ranks[0]["records"][step]
        if tol is not None:
            err = (rec["avg"] - rec["exact"]).norm() / rec["exact"].norm()
            assert err <= tol, f"step {step}: relative error {err:.2e} > {tol}"
        stats = rec["stats"]
        # raw = what an fp32 ring all-reduce of every gradient would send (docs/design.md invariant 4)
        assert stats["comm/bytes_raw"] == sum(
            wire_bytes("all_reduce", 4 * n, world) for n in _bucket_sizes(rec["numel"])) or \
            stats["comm/bytes_raw"] == pytest.approx(wire_bytes("all_reduce", 4 * rec["numel"],
                                                                world), rel=1e-3)
        if byte_ratio is not None:
            assert stats["comm/bytes_sent"] == pytest.approx(byte_ratio * stats["comm/bytes_raw"],
                                                             rel=1e-3)
    if name == "powersgd":  # vanilla all-reduce for start_powerSGD_iter steps, then low rank
        start = CASES[name][0].start_powerSGD_iter
        for step, rec in enumerate(ranks[0]["records"]):
            sent, raw = rec["stats"]["comm/bytes_sent"], rec["stats"]["comm/bytes_raw"]
            if step < start:
                assert torch.allclose(rec["avg"], rec["exact"], rtol=1e-5, atol=1e-7)
                assert sent == raw
            else:
                assert 0 < sent < raw, f"step {step}: sent {sent} raw {raw}"


def _bucket_sizes(total: int) -> list[int]:
    return [total]


def test_powersgd_state_round_trips(tmp_path):
    ranks = _run("powersgd", 2, tmp_path)
    state = ranks[0]["state"]["powersgd"]
    assert state["iter"] == STEPS
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fresh = build_scheme(PowerSGDConfig(start_powerSGD_iter=2))
        fresh.load_state_dict(ranks[0]["state"])
        again = fresh.state_dict()["powersgd"]
        assert fresh.state.process_group is fresh.process_group
    finally:
        teardown(barrier=True)
    assert again["iter"] == STEPS
    assert set(again["error_dict"]) == set(state["error_dict"])
    for k, v in state["error_dict"].items():
        assert torch.equal(again["error_dict"][k], v)
    # error feedback differs per rank: it must be saved per rank, not deduplicated
    other = ranks[1]["state"]["powersgd"]["error_dict"]
    assert any(not torch.equal(other[k], v) for k, v in state["error_dict"].items())


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_wire_bytes_formulas(world):
    s = 1000 * world
    assert wire_bytes("all_reduce", s, world) == 2 * (world - 1) * s // world
    assert wire_bytes("all_to_all", s, world) == (world - 1) * s // world
    assert wire_bytes("all_gather", s, world) == (world - 1) * s
    assert wire_bytes("broadcast", s, world, is_src=False) == 0
    if world == 1:
        assert wire_bytes("all_reduce", s, 1) == 0

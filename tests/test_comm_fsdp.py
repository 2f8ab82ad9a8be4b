"""dqt's codecs in FSDP2's gradient reduce-scatter (:mod:`dqt.comm.fsdp`) on real gloo groups of
2 and 4 ranks, with real ``fully_shard`` models whose parameters need FSDP's padding.

* the sharded gradient each rank receives equals, bit for bit, the mean (in rank order, fp32)
  of the peers' messages for its shard decoded one by one with the pure-torch reference
  kernels, and each rank's new residual is its own v − decode(v) (error feedback);
* the unsharded gradient is identical on every rank (an all-gather of the shards), for every
  codec, and bf16 / no scheme match FSDP's reduce-scatter within their precision;
* bytes: the compressed reduce-scatter sends (N − 1)/N of one packed copy, counted against FSDP's
  fp32 reduce-scatter;
* the residuals survive ``state_dict``/``load_state_dict`` and ``torch.distributed.checkpoint``
  (exactly on the same number of ranks; as their mean on another);
* misuse fails with one message.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dqt.comm import compress
from dqt.comm.collective import WORKER, TIES
from dqt.comm.config import SCHEME_CONFIGS
from dqt.kernels import blockq
from dqt.kernels.blockq import f32_recip
from dqt.kernels.philox import mix_seed
from tests.conftest import rank_process

fsdp = pytest.importorskip("torch.distributed.fsdp")
fully_shard = fsdp.fully_shard

CODECS = ("onebit", "ef_signsgd", "signsgd", "ternary_grad", "qsgd", "fp8")
TIMEOUT = datetime.timedelta(seconds=60)


def _model() -> nn.Module:
    """Odd shapes: FSDP pads the last ranks' shards (37 rows over 4 ranks: 10, 10, 10, 7)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(23, 37), nn.Tanh(), nn.Linear(37, 41), nn.Tanh(),
                      nn.Linear(41, 5))
    for layer in (m[0], m[2]):
        fully_shard(layer)
    fully_shard(m)
    return m


def _cfg(name: str):
    """Compressed from the first step, every module (none reaches ``min_bucket_numel``'s
    default of 1024 values on 4 ranks)."""
    return SCHEME_CONFIGS[name](warmup_steps=0, block_size=16, min_bucket_numel=0)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 23, generator=g), torch.randint(0, 5, (8,), generator=g)


def _full_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])


def _recording(cls: type, calls: list[dict]) -> type:
    class Recording(cls):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            before = None if self.residual is None else self.residual.clone()
            x = input_tensor.clone()
            super().__call__(output_tensor, input_tensor, group, op, async_op)
            calls.append({"index": self.index, "step": self.step - 1, "x": x,
                          "res_before": before,
                          "res_after": None if self.residual is None else self.residual.clone(),
                          "out": output_tensor.clone(), "layout": self._layout})

    return Recording


@rank_process
def _exact_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    results = {}
    for name in CODECS:
        model = _model()
        scheme = compress(model, _cfg(name))
        calls: list[dict] = []
        for comm in scheme.comms:  # record what each reduce-scatter saw and produced
            comm.__class__ = _recording(type(comm), calls)
        for step in range(3):
            model.zero_grad(set_to_none=True)
            x, y = _batch(rank, step)
            nn.functional.cross_entropy(model(x), y).backward()
        stats = scheme.stats()
        results[name] = {"calls": [{k: v for k, v in c.items() if k != "layout"}
                                   for c in calls],
                         "tables": [(c["layout"].all_blocks, c["layout"].own_blocks,
                                     c["layout"].msg_nbytes, c["layout"].flag_off)
                                    for c in calls],
                         "grads": _full_grads(model), "stats": stats}
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 4])
def exact_runs(request, tmp_path_factory):
    world, tmp = request.param, tmp_path_factory.mktemp(f"fsdp{request.param}")
    mp.spawn(_exact_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.mark.parametrize("name", CODECS)
def test_shard_is_the_mean_of_the_decoded_contributions(exact_runs, name):
    world = len(exact_runs)
    cfg = _cfg(name)
    spec = SCHEME_CONFIGS[name].block_spec(cfg)
    vote = name == "signsgd"
    ncalls = len(exact_runs[0][name]["calls"])
    assert ncalls == 3 * 3  # three fully_shard modules, three steps
    for i in range(ncalls):
        msgs = []
        for p in range(world):  # every rank's message, re-encoded with the reference kernels
            c = exact_runs[p][name]["calls"][i]
            all_blocks, _, M, flag_off = exact_runs[p][name]["tables"][i]
            send = torch.zeros(world * M, dtype=torch.uint8)
            res = None if c["res_before"] is None else c["res_before"].clone()
            blockq.encode(spec, c["x"], all_blocks, send, res, 1.0,
                          mix_seed(cfg.seed, c["step"], p, c["index"], WORKER), impl="reference")
            if res is not None:  # the rank's own residual: v − decode(v), as the kernel left it
                assert torch.equal(res, c["res_after"]), f"rank {p} call {i}: residual"
            msgs.append(send.view(world, M))
        for r in range(world):
            c = exact_runs[r][name]["calls"][i]
            _, own_blocks, M, flag_off = exact_runs[r][name]["tables"][i]
            total = torch.zeros_like(c["out"])
            for p in range(world):  # each contribution decoded alone, summed in rank order
                d = torch.zeros_like(c["out"])
                blockq.decode(spec, msgs[p][r].contiguous(), own_blocks, d, npeers=1,
                              peer_stride=M, flag_off=flag_off, mode="copy", impl="reference")
                total = total + d
            if vote:
                expected = blockq.decode  # majority vote: sign of the sum, fair coin on ties
                expected = total.clone()
                from dqt.comm.collective import majority_vote

                majority_vote(expected, mix_seed(cfg.seed, c["step"], r, c["index"], TIES))
            else:
                expected = total * f32_recip(world)
            assert torch.equal(c["out"], expected), f"rank {r} call {i}: shard != mean"
        assert sum(float(exact_runs[r][name]["calls"][i]["out"].abs().sum())
                   for r in range(world)) > 0  # (a rank's shard may be all padding)


@pytest.mark.parametrize("name", CODECS)
def test_every_rank_holds_the_same_gradient(exact_runs, name):
    for r, res in enumerate(exact_runs):
        assert torch.equal(res[name]["grads"], exact_runs[0][name]["grads"]), f"rank {r}"


@pytest.mark.parametrize("name", CODECS)
def test_bytes_are_counted_against_fsdps_reduce_scatter(exact_runs, name):
    world = len(exact_runs)
    stats = exact_runs[0][name]["stats"]
    numel = sum(c["x"].numel() for c in exact_runs[0][name]["calls"])
    assert stats["comm/bytes_raw"] == sum((world - 1) * c["x"].numel() * 4 // world
                                          for c in exact_runs[0][name]["calls"])
    M = [t[2] for t in exact_runs[0][name]["tables"]]
    assert stats["comm/bytes_sent"] == sum((world - 1) * m for m in M)
    spec = SCHEME_CONFIGS[name].block_spec(_cfg(name))
    bits = (spec.code_bits or 1.6) + 8 * spec.scale_nbytes / spec.block  # per value on the wire
    # FSDP's zero padding is not sent: the ratio is at least that of the codec (less the
    # messages' word alignment and the vote's flag byte, on this small model)
    assert stats["comm/ratio"] > 0.8 * 32 / bits, stats
    assert numel > 0


# ---------------------------------------------------------------------- state and checkpoints
def _run(model: nn.Module, rank: int, steps: range) -> list[torch.Tensor]:
    grads = []
    for step in steps:
        model.zero_grad(set_to_none=True)
        x, y = _batch(rank, step)
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(_full_grads(model))
    return grads


@rank_process
def _state_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    model = _model()
    scheme = compress(model, _cfg("onebit"))
    _run(model, rank, range(3))
    per_rank = scheme.state_dict()
    dcp.save(scheme.sharded_state_dict(), checkpoint_id=f"{out}/dcp{world}")
    after = _run(model, rank, range(3, 5))  # the uninterrupted run
    result = {"state": per_rank, "after": after}
    for how in ("per_rank", "dcp"):  # a fresh process's model and scheme, restored
        model = _model()
        scheme = compress(model, _cfg("onebit"))
        if how == "per_rank":
            scheme.load_state_dict(per_rank)
        else:
            state = scheme.sharded_state_dict()
            dcp.load(state, checkpoint_id=f"{out}/dcp{world}")
            scheme.load_sharded_state_dict(state)
        result[how] = _run(model, rank, range(3, 5))
    other = {2: 4, 4: 2}[world]  # a checkpoint written by another number of ranks, if any
    import os

    if os.path.isdir(f"{out}/dcp{other}"):
        model = _model()
        scheme = compress(model, _cfg("onebit"))
        state = scheme.resharded_template(other)
        dcp.load(state, checkpoint_id=f"{out}/dcp{other}")
        scheme.load_resharded(state)
        result["resharded"] = scheme.state_dict()
    torch.save(result, f"{out}/state{world}_rank{rank}.pt")


def test_residuals_resume_exactly_and_reshard_to_their_mean(tmp_path):
    for world in (2, 4):  # 4 ranks also load the 2 ranks' checkpoint
        mp.spawn(_state_worker, args=(world, str(tmp_path / f"store{world}"), str(tmp_path)),
                 nprocs=world, join=True)
    saved = [torch.load(tmp_path / f"state2_rank{r}.pt", weights_only=False) for r in range(2)]
    for world in (2, 4):
        for r in range(world):
            res = torch.load(tmp_path / f"state{world}_rank{r}.pt", weights_only=False)
            assert res["state"]["steps"] == [3, 3, 3]
            for how in ("per_rank", "dcp"):
                for a, b in zip(res["after"], res[how]):
                    assert torch.equal(a, b), f"{world} ranks, rank {r}: {how} resume differs"
            if world == 4:
                got = res["resharded"]["residual"]
                assert got.keys() == saved[0]["state"]["residual"].keys()
                for k, v in got.items():
                    mean = torch.stack([s["state"]["residual"][k] for s in saved]).mean(0)
                    assert torch.equal(v, mean), k
                    assert v.abs().sum() > 0, k


@rank_process
def _plain_worker(rank: int, world: int, store: str, out: str) -> None:
    from dqt.comm import BF16, PowerSGD

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    result = {"fsdp": _run(_model(), rank, range(2))}  # FSDP's own reduce-scatter
    for name, cfg in (("plain", None), ("bf16", BF16())):
        model = _model()
        scheme = compress(model, cfg)
        result[name] = _run(model, rank, range(2))
        result[name + "_stats"] = scheme.stats()
    # the parameters all-gathered in bf16: forward computes with their rounded copies
    model = _model()
    scheme = compress(model, "onebit", gather="bf16")
    seen = []
    model[2].register_forward_pre_hook(  # after FSDP's own pre-forward (the unshard)
        lambda m, i: seen.append(m.weight.detach().clone()))
    result["bf16_gather"] = _run(model, rank, range(1))
    result["gathered_weight"] = seen[0]
    result["full_weight"] = model[2].weight.full_tensor()
    result["gather_stats"] = scheme.stats()
    errors = {}
    model = _model()
    for what, call in (("powersgd", lambda: compress(model, PowerSGD())),
                       ("module", lambda: compress(nn.Linear(3, 3), "onebit"))):
        try:
            call()
        except (TypeError, RuntimeError) as e:
            errors[what] = str(e)
    compress(model, "onebit")
    try:
        compress(model, "onebit")
    except RuntimeError as e:
        errors["twice"] = str(e)
    result["errors"] = errors
    torch.save(result, f"{out}/plain_rank{rank}.pt")


def test_plain_and_bf16_reduce_scatter_and_misuse(tmp_path):
    mp.spawn(_plain_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
             join=True)
    res = torch.load(tmp_path / "plain_rank0.pt", weights_only=False)
    for a, b, c in zip(res["fsdp"], res["plain"], res["bf16"]):
        assert torch.equal(a, b)  # the counted plain path is FSDP's own reduce-scatter
        assert not torch.equal(a, c)
        # bf16 (8 significant bits): each contribution and their sum rounded once
        assert (a - c).abs().max() <= 2 ** -7 * a.abs().max()
    numel = res["fsdp"][0].numel()
    assert res["plain_stats"]["comm/bytes_sent"] == res["plain_stats"]["comm/bytes_raw"]
    assert res["bf16_stats"]["comm/ratio"] == pytest.approx(2.0, rel=0.01)
    assert res["plain_stats"]["comm/bytes_raw"] >= 2 * numel * 4 // 2  # two steps, N = 2
    w, full = res["gathered_weight"], res["full_weight"]
    assert full.dtype == torch.float32 and not torch.equal(w, full)
    assert torch.equal(w, full.to(torch.bfloat16).float())  # the sharded fp32 stays exact
    g = res["gather_stats"]  # forward and backward gather every module: half the fp32 bytes
    assert g["comm/gather_bytes_raw"] == 2 * g["comm/gather_bytes_sent"] > 0
    assert torch.isfinite(res["bf16_gather"][0]).all()
    e = res["errors"]
    assert "powersgd cannot run in FSDP's reduce-scatter" in e["powersgd"]
    assert "DistributedDataParallel" in e["module"] and "fully_shard" in e["module"]
    assert "already has a dqt scheme" in e["twice"]

"""Stateful quantizers: Autoflex exponent management against a re-derivation of ngraph's
algorithm (history, max + 3σ, overflow), the EMA observer, checkpoint round trip, state
identical across 2 real gloo ranks under DDP, and one end-to-end torchrun run with QAT and a
gradient-compression scheme."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import rank_process, read_metrics, run_train, summary
from dqt.quant.config import QATConfig, QATRuleConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant import QUANTIZERS, apply_qat, qat_step


def ref_autoflex(maxima, history=16, bits=16):
    """ngraph flexgpu.py: deque of maxima, maxval = max + 3σ + 100·scale, κ = ⌊log2 maxval⌋ − 14;
    overflow (max ≥ (2^15 − 1)·scale): clear the deque, record 2·max. κ₀ from the first max."""
    dq, kappa, overflows, out = [], None, 0, []
    for m in maxima:
        if kappa is None:
            kappa = max(-32, min(0, math.floor(math.log2(m)) - (bits - 2)))
        scale = 2.0 ** kappa
        if m >= (2 ** (bits - 1) - 1) * scale:
            overflows += 1
            dq = []
            m = 2 * m
        dq = (dq + [m])[-history:]
        maxval = max(dq) + 3 * np.std(dq) + 100 * scale
        kappa = max(-32, min(0, math.floor(math.log2(maxval)) - (bits - 2)))
        out.append(kappa)
    return out, overflows


def test_autoflex_follows_the_reference_including_overflow():
    q = QUANTIZERS.get("flex")("act", history=4)
    maxima = [0.9, 1.1, 1.0, 0.95, 1.2, 30.0, 28.0, 1e-3, 2.0, 2.1]  # 30.0 overflows
    got = []
    for m in maxima:
        q.commit(torch.tensor([m]))
        got.append(int(q.kappa))
    expected, overflows = ref_autoflex(maxima, history=4)
    assert got == expected
    assert int(q.overflows) == overflows >= 1
    # a non-overflowing tensor quantizes within the int16 range with the predicted exponent
    x = torch.full((3,), 1.9)
    q.eval()
    assert float(q(x)[0]) == round(1.9 / 2 ** got[-1]) * 2 ** got[-1]


def test_autoflex_exponent_is_clamped():
    q = QUANTIZERS.get("flex")("weight")
    q.commit(torch.tensor([1e-20]))
    assert int(q.kappa) == -32
    q2 = QUANTIZERS.get("flex")("weight")
    q2.commit(torch.tensor([1e9]))
    assert int(q2.kappa) == 0


def test_ema_observer_commits_the_reduced_range():
    q = QUANTIZERS.get("uint")("act", bits=8, momentum=0.25).train()
    x1, x2 = torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])
    with torch.enable_grad():
        q(x1)
    q.commit(q.stats())  # first commit initialises
    assert (float(q.observer.lo), float(q.observer.hi)) == (-1.0, 2.0)
    with torch.enable_grad():
        q(x2)
    q.commit(q.stats())
    assert float(q.observer.lo) == pytest.approx(0.75 * -1 + 0.25 * -3)
    assert float(q.observer.hi) == pytest.approx(0.75 * 2 + 0.25 * 1)
    q.eval()(torch.tensor([5.0]))
    assert q.stats() is not None and not torch.isfinite(q.stats()).any()  # eval records nothing


def test_quantizer_state_round_trips_through_state_dict():
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="ttq"),
                                                     act=QuantizerConfig(name="flex")),
                    keep_first_last=False)
    torch.manual_seed(0)
    a = apply_qat(cfg, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    a(torch.randn(5, 4)).sum().backward()
    qat_step(a)
    sd = a.state_dict()
    assert {"0.input_quantizer.kappa", "0.input_quantizer.maxima", "0.parametrizations.weight.0.w_p"} <= set(sd)
    torch.manual_seed(1)
    b = apply_qat(cfg, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    b.load_state_dict(sd)
    x = torch.randn(3, 4)
    assert torch.equal(a.eval()(x), b.eval()(x))


# ------------------------------------------------------------------ 2 gloo ranks
@rank_process
def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = QATConfig(name="t", keep_first_last=False, default=QATSlotsConfig(
        weight=QuantizerConfig(name="lsq", bits=4), act=QuantizerConfig(name="uint", bits=8)),
        rules=[QATRuleConfig(match="2", weight=QuantizerConfig(name="flex"),
                             act=QuantizerConfig(name="lsq", bits=4),
                             grad=QuantizerConfig(name="flex"))])
    model = apply_qat(cfg, nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    local = []
    for _ in range(4):
        x = torch.randn(8, 6, generator=gen) * (1 + 3 * rank)
        local.append(float(x.max()))
        ddp(x).square().mean().backward()
        opt.step(), opt.zero_grad()
        qat_step(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "local_max": local}, f"{out}/rank{rank}.pt")



@pytest.mark.slow
def test_quantizer_state_identical_on_two_gloo_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["local_max"] != r1["local_max"]  # the ranks saw different data ...
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # ... and hold the same state
    s = r0["state"]
    assert bool(s["0.input_quantizer.observer.initialized"])
    assert bool(s["2.input_quantizer.initialized"]) and bool(s["2.parametrizations.weight.0.initialized"])
    assert int(s["2.grad_quantizer.count"]) == 4 and int(s["2.parametrizations.weight.0.count"]) == 4
    # the EMA range was initialised from the max over *both* ranks' first batch
    # (rank 1's inputs are 4x larger, so its maximum wins)
    assert float(s["0.input_quantizer.observer.hi"]) > 0.9 * max(r0["local_max"][0], r1["local_max"][0])


@pytest.mark.slow
def test_qat_with_gradient_compression_two_ranks_end_to_end(tmp_path):
    run = tmp_path / "run"
    p = run_train("qat=dorefa_w2a2", "model.batch_norm=true", "+scheme=ternary_grad", "steps=60",
                  "log_every=5", "eval_every=0", f"hydra.run.dir={run}", nproc=2, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(run)
    assert s["world_size"] == 2 and s["scheme"] == "ternary_grad" and s["qat"] == "dorefa_w2a2"
    assert s["params_in_sync"] is True
    assert s["eval/acc"] > 0.6, s
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert train[-1]["train/loss"] < 0.5 * train[0]["train/loss"]  # step 60 vs step 5
    assert s["comm/ratio"] > 5  # gradients really went out compressed
    assert s["qat/params_by_bits"]["2-bit"] == 256 * 256
    log = (run / "train_rank0.log").read_text()
    assert re.search(r"net\.3 +Linear +dorefa_w\(bits=2, rescale=False\) +dorefa_a\(bits=2\) +fp32 "
                     r"+default", log)  # the paper's formula, a BatchNorm after the layer
    assert "assumes a BatchNorm" not in log

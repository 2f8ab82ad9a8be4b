"""The second tier of the survey: Q-CNN (``pq``), BWNH (``bwnh``), FFN (``ffn``), TNN (``tnn_a``
+ ``twn``) and WAGE (``wage_w``/``wage_a``/``wage_e``) — goldens that need a layer, data or the
backward pass, the STE masks, properties that pin the algorithms down, config errors, and BWNH's
activation statistics identical on two gloo ranks (plus a 2-rank torchrun run)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import rank_process, run_train, summary
from tests.test_quant_ste import grad_of, make
from dqt.errors import ConfigError
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant import apply_qat, qat_step
from dqt.quant.methods.factorized import sdd, ternary_max
from dqt.quant.input_stats import RIDGE
from dqt.quant.methods.wage import init_limit, layer_scale, quantize_grad
from tests.seed_c_refs import np_bwnh, np_pq_error_correct, np_sdd, np_wage_e, np_wage_g

RNG = np.random.default_rng(3)


# ------------------------------------------------------------------ WAGE
def test_wage_e_golden():
    e = (RNG.standard_normal((4, 3, 5)) * 3e-3).astype(np.float32)
    for rescale in (False, True):
        q = make("wage_e", "grad", bits=8, rescale=rescale)
        x = torch.randn(4, 3, 5, requires_grad=True)
        out = q(x)
        assert torch.equal(out, x)  # identity forward
        out.backward(torch.from_numpy(e))
        expected, ok = np_wage_e(e, 8, rescale)
        assert ok.mean() > 0.95
        np.testing.assert_allclose(x.grad.numpy()[ok], expected[ok], rtol=1e-6, atol=1e-12)
    # the normalized error lies on the σ(8) = 2⁻⁷ grid inside [−1 + σ, 1 − σ]
    assert (x.grad.abs() > 0).any()
    q = make("wage_e", "grad", bits=4)
    x = torch.randn(4, 3, 5, requires_grad=True)
    q(x).backward(torch.from_numpy(e))
    assert torch.equal(x.grad * 8, torch.round(x.grad * 8)) and x.grad.abs().max() <= 1 - 1 / 8


def test_wage_g_golden_and_the_weight_backward():
    g = (RNG.standard_normal((6, 10)) * 1e-2).astype(np.float32)
    u = RNG.uniform(size=g.shape).astype(np.float32)
    y = quantize_grad(torch.from_numpy(g), 8, 8.0, torch.from_numpy(u)).numpy()
    expected, ok = np_wage_g(g, 8, 8.0, u)
    assert ok.mean() > 0.95 and np.abs(expected).max() > 0
    np.testing.assert_allclose(y[ok], expected[ok], rtol=1e-6, atol=0)
    # the registered weight quantizer applies Q_G to the gradient of W (torch's uniforms)
    q = make("wage_w", "weight", bits=2, grad_bits=8, grad_lr=8.0)
    w = torch.randn(6, 10) * 0.3
    torch.manual_seed(5)
    gw, _, _ = grad_of(q, w, torch.from_numpy(g))
    torch.manual_seed(5)
    u2 = torch.rand(6, 10).numpy()
    expected2, ok2 = np_wage_g(g, 8, 8.0, u2)
    np.testing.assert_allclose(gw.numpy()[ok2], expected2[ok2], rtol=1e-6, atol=0)
    # without grad_bits: identity STE through clip and rounding
    gw, g2, _ = grad_of(make("wage_w", "weight"), w * 5)
    assert torch.equal(gw, g2)


def test_wage_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    g = torch.tensor([0.3, -0.55, 1.0, 0.05]).repeat(40000, 1)
    # Shift(max|g|) = 1; η = 1: g_s = g; E[Q_G] = σ·g_s
    out = quantize_grad(g, 2, 1.0, torch.rand_like(g)) / 0.5
    np.testing.assert_allclose(out.mean(0).numpy(), [0.3, -0.55, 1.0, 0.05], atol=0.01)
    assert set(out.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_wage_layer_scale_init_and_clip():
    # α = max(Shift(1.5σ/√(3/fan_in)), 1): k = 2 → σ = ½
    assert layer_scale(24, 2) == 2.0  # 0.75/0.354 = 2.12 → 2^1
    assert layer_scale(800, 2) == 16.0  # 0.75/0.0612 = 12.2 → 2^round(3.61) = 16
    assert layer_scale(3, 2) == 1.0  # limit 1 > 0.75: no scale
    assert init_limit(800, 2) == 0.75 and init_limit(3, 2) == 1.0
    lin = nn.Linear(800, 4)
    cfg = QATConfig(name="t", keep_first_last=False,
                    default=QATSlotsConfig(weight=QuantizerConfig(name="wage_w", bits=2)))
    apply_qat(cfg, nn.Sequential(lin))
    real = lin.parametrizations.weight.original
    assert float(real.detach().abs().max()) == pytest.approx(0.75)  # rescaled to WAGE's init limit
    assert set((lin.weight * 16 / 0.5).detach().unique().tolist()) <= {-1.0, 0.0, 1.0}
    with torch.no_grad():
        real.mul_(3)
    qat_step(lin)  # clips the real weight to [−1 + σ, 1 − σ]
    assert float(real.detach().abs().max()) == 0.5


def test_wage_a_clip_mask():
    x = torch.linspace(-2, 2, 81).reshape(1, -1)
    gx, g, y = grad_of(make("wage_a", "act", bits=8), x)
    assert torch.equal(gx, g * (x.abs() <= 1 - 2 ** -7))
    assert torch.equal(y.detach() * 128, torch.round(y.detach() * 128))


# ------------------------------------------------------------------ TNN
def test_tnn_a_hardtanh_ste_and_values():
    x = torch.linspace(-2, 2, 81).reshape(1, -1)
    gx, g, y = grad_of(make("tnn_a", "act").eval(), x)
    assert torch.equal(gx, g * (x.abs() <= 1))
    assert set(y.detach().unique().tolist()) == {-1.0, 0.0, 1.0}


def test_tnn_a_stochastic_fires_with_probability_abs_x():
    torch.manual_seed(0)
    q = make("tnn_a", "act", stochastic=True).train()
    x = torch.tensor([-1.5, -0.3, 0.0, 0.6]).repeat(20000, 1)
    y = q(x)
    np.testing.assert_allclose(y.abs().mean(0).numpy(), [1.0, 0.3, 0.0, 0.6], atol=0.015)
    assert torch.equal(torch.sign(y[(y != 0)]), torch.sign(x[(y != 0)]))


# ------------------------------------------------------------------ Q-CNN
def test_pq_is_lossless_when_every_row_has_its_own_codeword():
    w = torch.randn(8, 12, 3, 3)
    q = make("pq", "weight", bits=3, sub_dim=4)  # K = 8 = N codewords per subspace
    assert torch.equal(q(w), w)
    q = make("pq", "weight", bits=2, sub_dim=4)  # K = 4 < N: lossy, 4 distinct sub-vectors
    y = q(w)
    sub = y[:, 0:4, 1, 2]  # subspace (p, m) = (position 5, channels 0..3)
    assert len({tuple(r) for r in sub.tolist()}) <= 4 and not torch.equal(y, w)


def test_pq_kmeans_does_not_increase_the_error_with_iterations():
    w = torch.randn(32, 64)
    errs = [float((make("pq", "weight", bits=3, sub_dim=4, iters=i)(w) - w).square().sum())
            for i in (1, 3, 10)]
    assert errs[0] >= errs[1] >= errs[2]


# ------------------------------------------------------------------ FFN
def test_ternary_max_is_the_exact_maximiser():
    s = torch.tensor([0.1, -2.0, 0.9, 1.0, -0.05])
    best, arg = -1.0, None
    for v in itertools.product([-1.0, 0.0, 1.0], repeat=5):
        t = torch.tensor(v)
        if t.abs().sum() == 0 or float(t @ s) <= 0:  # ±x score the same: the one with xᵀs > 0
            continue
        val = float((t @ s) ** 2 / (t @ t))
        if val > best:
            best, arg = val, list(v)
    assert ternary_max(s.numpy()).tolist() == arg == [0.0, -1.0, 1.0, 1.0, 0.0]


def test_sdd_recovers_a_ternary_rank_one_matrix_and_converges():
    x = torch.tensor([1.0, 0, -1, 1, 0, 0])
    y = torch.tensor([0.0, 1, 1, -1, 0, 1, 0, -1])
    w = 0.37 * torch.outer(x, y)
    xs, d, ys = sdd(w, 1, 3)
    torch.testing.assert_close((xs * d) @ ys.t(), w)
    w = torch.randn(12, 20)
    errs = [float((make("ffn", "weight", rank=r)(w) - w).norm()) for r in (1, 4, 12, 40)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    ref, _ = np_sdd(w.numpy(), 4, 10)
    np.testing.assert_allclose(make("ffn", "weight", rank=4)(w).numpy(), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ BWNH
def _bwnh_layer(layer, x, iters=2):
    cfg = QATConfig(name="t", keep_first_last=False,
                    default=QATSlotsConfig(weight=QuantizerConfig(name="bwnh", iters=iters,
                                                                  momentum=1.0)))
    apply_qat(cfg, nn.Sequential(layer))
    q = layer.parametrizations.weight[0]
    layer.train()
    layer(x).sum().backward()
    qat_step(layer)
    return q


def test_bwnh_solves_the_hashing_problem_on_the_layer_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6, bias=False)
    x = torch.randn(64, 10) @ torch.randn(10, 10)  # correlated inputs: S far from I
    q = _bwnh_layer(lin, x, iters=3)
    s = x.t() @ x / 64
    s = s + RIDGE * torch.diagonal(s).mean() * torch.eye(10)
    torch.testing.assert_close(q.S, s, rtol=1e-5, atol=1e-5)
    w = lin.parametrizations.weight.original.detach()
    wq = lin.weight.detach()
    expected, _ = np_bwnh(w.numpy(), s.numpy(), 3)
    np.testing.assert_allclose(wq.numpy(), expected, rtol=1e-4, atol=1e-6)

    def response_err(wb):
        return float((x @ (w - wb).t()).square().sum())

    bwn = w.abs().mean(1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0)
    assert response_err(wq) < response_err(bwn)  # better than BWN on the inputs it saw
    assert not torch.equal(torch.sign(wq), torch.where(w >= 0, 1.0, -1.0))  # B left sign(W)


def test_bwnh_conv_records_im2col_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 5, 5)
    q = _bwnh_layer(conv, x)
    cols = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    s = cols.t() @ cols / cols.shape[0]
    torch.testing.assert_close(q.S, s + RIDGE * torch.diagonal(s).mean() * torch.eye(27))
    assert "S" not in dict(conv.state_dict())  # not exported / checkpointed


def test_bad_arguments_name_the_key():
    for spec, key in [(QuantizerConfig(name="pq", sub_dim=0), "qat.default.weight.sub_dim"),
                      (QuantizerConfig(name="ffn", rank=0), "qat.default.weight.rank"),
                      (QuantizerConfig(name="bwnh", iters=0), "qat.default.weight.iters"),
                      (QuantizerConfig(name="wage_w", grad_bits=1), "qat.default.weight.grad_bits"),
                      (QuantizerConfig(name="wage_w", grad_lr=-1.0), "qat.default.weight.grad_lr"),
                      (QuantizerConfig(name="pq", rank=3), "qat.default.weight.rank")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            QATConfig(name="t", default=QATSlotsConfig(weight=spec))
    with pytest.raises(ConfigError, match=r"qat\.default\.act\.threshold"):
        QATConfig(name="t", default=QATSlotsConfig(act=QuantizerConfig(name="tnn_a", threshold=1.5)))


# ------------------------------------------------------------------ 2 gloo ranks
@rank_process
def _bwnh_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    cfg = QATConfig(name="t", keep_first_last=False,
                    default=QATSlotsConfig(weight=QuantizerConfig(name="bwnh")))
    model = apply_qat(cfg, nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    xs = []
    for _ in range(3):
        x = torch.randn(8, 6, generator=gen) * (1 + 3 * rank)
        xs.append(x)
        ddp(x).square().mean().backward()
        opt.step(), opt.zero_grad()
        qat_step(model)
    torch.save({"S": model[0].parametrizations.weight[0].S.clone(), "xs": xs,
                "w": model[0].weight.detach().clone(), "state": model.state_dict()},
               f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_bwnh_statistics_are_summed_over_ranks_and_identical(tmp_path):
    mp.spawn(_bwnh_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert torch.equal(r0["S"], r1["S"]) and torch.equal(r0["w"], r1["w"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # S = EMA (momentum 0.1) of XXᵀ/rows over *both* ranks' batches (+ the ridge)
    s = None
    for x0, x1 in zip(r0["xs"], r1["xs"]):
        x = torch.cat([x0, x1])
        new = x.t() @ x / 16
        new = new + RIDGE * torch.diagonal(new).mean() * torch.eye(6)
        s = new if s is None else 0.9 * s + 0.1 * new
    torch.testing.assert_close(r0["S"], s, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bwnh_two_rank_run_keeps_parameters_identical(tmp_path):
    run = tmp_path / "run"
    p = run_train("experiment=digits_cnn_bn", "qat=bwnh", "steps=20", "log_every=5",
                  "eval_every=0", f"hydra.run.dir={run}", nproc=2, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(run)
    assert s["world_size"] == 2 and s["qat"] == "bwnh" and s["params_in_sync"] is True
    assert "params identical on all ranks: True" in (run / "train_rank0.log").read_text()
    assert s["qat/params_by_bits"]["1-bit"] > 0 and math.isfinite(s["eval/acc"])


# ------------------------------------------------------------------ Q-CNN error correction
def _pq_on_inputs(response, x, iters=10):
    torch.manual_seed(0)
    lin = nn.Linear(16, 32, bias=False)
    cfg = QATConfig(name="t", keep_first_last=False, default=QATSlotsConfig(
        weight=QuantizerConfig(name="pq", bits=2, sub_dim=4, iters=iters, response=response,
                               momentum=1.0)))
    model = apply_qat(cfg, nn.Sequential(lin))
    model(x).sum().backward()
    qat_step(model)
    return lin


def test_pq_error_correction_golden_and_lower_response_error():
    torch.manual_seed(1)
    x = torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs
    plain, corrected = _pq_on_inputs(False, x), _pq_on_inputs(True, x)
    w = corrected.parametrizations.weight.original.detach()
    assert torch.equal(w, plain.parametrizations.weight.original.detach())
    q = corrected.parametrizations.weight[0]
    assert q.S.shape == (16, 16)
    # golden: one round of the paper's block coordinate descent from the k-means codebooks
    from dqt.quant.methods.product import as_ncp, kmeans, subvectors
    cb, idx = kmeans(subvectors(as_ncp(w), 4), 4, 10)
    expected = np_pq_error_correct(w.numpy(), q.S.numpy(), cb.numpy(), idx.numpy(), 4)
    np.testing.assert_allclose(corrected.weight.detach().numpy(), expected, rtol=1e-4, atol=1e-5)

    def response_err(lin):
        return float((x @ (w - lin.weight.detach()).t()).square().sum())

    assert response_err(corrected) < 0.9 * response_err(plain)
    codes = q.encode(w)  # the export decodes to the corrected weight, bit for bit
    assert torch.equal(codes.decode(), corrected.weight.detach())
    assert plain.parametrizations.weight[0].S.numel() == 0  # response: false records nothing


def test_pq_error_correction_with_identity_s_is_kmeans():
    w = torch.randn(32, 16)
    a = make("pq", "weight", bits=2, sub_dim=4, iters=200)
    b = make("pq", "weight", bits=2, sub_dim=4, iters=200, response=True)  # S = I: no stats yet
    assert torch.equal(a(w), b(w))

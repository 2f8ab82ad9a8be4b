"""SLQ (``slq``: staged k-means with the loss-based partition of Xu et al. 2018) and EBP
(``ebp``: the mean-field binary posterior of Soudry, Hubara & Meir 2014): each paper's defining
property, config errors, state across a checkpoint, and 2-rank runs whose ranks stay identical."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dqt.errors import ConfigError
from dqt.quant import QUANTIZERS, apply_qat, qat_step
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant.export.codes import Affine, Dense, SharedCodebook
from dqt.quant.methods.ebp import moments
from tests.conftest import run_train, summary
from tests.quant_refs import np_slq_stage


def make(name, **args):
    return QUANTIZERS.get(name)("weight", **args)


def qat(name, **args):
    return QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name=name, **args)),
                     keep_first_last=False)


# ------------------------------------------------------------------ SLQ
def test_slq_stages_quantize_the_lowest_loss_clusters_and_end_on_k_centroids():
    """Schedule 0, 1/4, 1/2, 3/4, 1 of K = 8 clusters, a stage every 2 steps: after each stage
    exactly round(σ·K) clusters are quantized; the new ones are the lowest-loss clusters of a
    k-means of the still-free weights (numpy reference); frozen weights sit exactly on their
    centroid and never move (momentum and weight decay included); at the end every weight is
    one of the K centroids and the export is the shared codebook."""
    torch.manual_seed(0)
    sched = [0.0, 0.25, 0.5, 0.75, 1.0]
    model = apply_qat(qat("slq", bits=3, schedule=sched, stage_steps=2),
                      nn.Sequential(nn.Linear(32, 16)))
    q = model[0].parametrizations.weight[0]
    orig = model[0].parametrizations.weight.original
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x = torch.randn(64, 32)
    assert int(q.used) == 0 and not q.frozen.any()  # stage 0: full precision
    frozen_vals: dict[tuple[int, int], float] = {}
    used = []
    for step in range(1, 11):
        model(x).square().mean().backward()
        g = orig.grad.clone()
        assert torch.equal(g[q.frozen], torch.zeros_like(g[q.frozen]))  # frozen: zero gradient
        assert q.frozen.all() or (g[~q.frozen] != 0).any()  # the free weights train
        opt.step(), opt.zero_grad()
        before = q.frozen.clone()
        used_before = int(q.used)
        free = orig.detach()[~before].numpy()
        qat_step(model)
        used.append(int(q.used))
        new = q.frozen & ~before
        if int(q.used) > used_before:  # a stage ran: check the partition against numpy
            m = round(sched[(step // 2)] * 8)
            assert int(q.used) == m
            pick, cval, losses = np_slq_stage(free, 8 - used_before, m - used_before)
            if m < 8:
                assert losses[m - used_before - 1] < losses[m - used_before]  # no tie at the cut
            assert np.array_equal(new[~before].numpy(), pick)
            np.testing.assert_allclose(model[0].weight.detach()[new].numpy(), cval[pick],
                                       rtol=1e-5, atol=1e-7)
        w = model[0].weight.detach()
        assert torch.equal(w[q.frozen], q.centroids[q.index.long()][q.frozen])
        for i in q.frozen.nonzero().tolist():
            v = float(w[tuple(i)])
            assert frozen_vals.setdefault(tuple(i), v) == v
    assert used == [0, 2, 2, 4, 4, 6, 6, 8, 8, 8]
    w = model[0].weight.detach()
    assert q.frozen.all() and set(w.unique().tolist()) <= set(q.centroids.tolist())
    assert len(w.unique()) <= 8
    codes = q.encode(w)
    assert isinstance(codes, SharedCodebook) and torch.equal(codes.decode(), w.reshape(16, -1))


def test_slq_partition_is_by_loss_not_by_size():
    """Clusters around −1 (tight, 40 weights), 0 (wide, 8), +1 (tight, 30) and a lone 3.0: with
    K = 4 and half quantized, the two clusters of lowest Σ(w − c)² go first — 3.0 (loss 0)
    and the tight one at +1 (≈ 0.003) — not the smallest (the wide one, ≈ 0.18) nor the
    tight largest at −1 (≈ 0.004)."""
    g = torch.Generator().manual_seed(0)
    w = torch.cat([-1 + 0.01 * torch.randn(40, generator=g), 0.15 * torch.randn(8, generator=g),
                   1 + 0.01 * torch.randn(30, generator=g), torch.tensor([3.0])]).reshape(1, -1)
    q = make("slq", bits=2, schedule=[0.5, 1.0])
    q.init_from(w)
    assert int(q.used) == 2
    assert torch.equal(q.frozen, w > 0.5)
    assert float(q.centroids[0]) == 3.0  # ranked first: loss exactly 0
    torch.testing.assert_close(q.centroids[1], w[(w > 0.5) & (w < 2)].mean())
    assert torch.equal(q(w)[~q.frozen], w[~q.frozen])


def test_slq_empty_clusters_are_quantized_last():
    """Two distinct values and K = 4: two linear-init clusters stay empty; the first stage
    (half of K = 2 clusters) takes the two non-empty ones, so every weight is quantized."""
    w = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]])
    q = make("slq", bits=2, schedule=[0.5, 1.0])
    q.init_from(w)
    assert int(q.used) == 2 and q.frozen.all() and torch.equal(q(w), w)


def test_slq_state_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = qat("slq", schedule=[0.5, 0.75, 1.0], stage_steps=1)
    a = apply_qat(cfg, nn.Sequential(nn.Linear(16, 8)))
    a[0].parametrizations.weight[0].after_step(a[0].parametrizations.weight.original)
    torch.manual_seed(1)
    b = apply_qat(cfg, nn.Sequential(nn.Linear(16, 8)))
    b.load_state_dict(a.state_dict())
    qa, qb = a[0].parametrizations.weight[0], b[0].parametrizations.weight[0]
    assert int(qb.stage) == 1 and int(qb.steps) == 1 and int(qb.used) == 12
    assert torch.equal(qa.frozen, qb.frozen) and torch.equal(a[0].weight, b[0].weight)


def test_slq_start_step_delays_the_schedule():
    q = make("slq", bits=2, schedule=[0.5, 1.0], stage_steps=2, start_step=3)
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    q.init_from(w)
    stages = []
    for _ in range(6):
        stages.append(int(q.used))
        q.after_step(w)
    assert stages == [0, 0, 0, 2, 2, 4]
    assert isinstance(q.encode(w), SharedCodebook)
    q0 = make("slq", schedule=[0.0])  # never leaves full precision
    q0.init_from(w)
    assert isinstance(q0.encode(w), Dense) and torch.equal(q0(w), w)


def test_mlq_quantizes_the_layers_one_after_another():
    """MLQ (``layer_steps``): the ℓ-th quantized layer, in module order, starts its schedule
    ℓ·layer_steps steps after the first; while layer 0 is being quantized the deeper layers
    are still full precision and train, and at the end every layer is on its K centroids."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                        nn.Linear(16, 4))
    model = apply_qat(qat("slq", bits=2, schedule=[0.0, 0.5, 1.0], stage_steps=2,
                          layer_steps=3), net)
    qs = [model[i].parametrizations.weight[0] for i in (0, 2, 4)]
    assert [q.__dict__["layer_index"] for q in qs] == [0, 1, 2]
    assert [q.first_step() for q in qs] == [0, 3, 6]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 12)
    used = []
    for _ in range(12):
        model(x).square().mean().backward()
        opt.step(), opt.zero_grad()
        qat_step(model)
        used.append([int(q.used) for q in qs])
    # layer ℓ: stage 1 (2 of 4 clusters) after step first + 2, stage 2 (all 4) after first + 4
    assert used == [[0, 0, 0], [2, 0, 0], [2, 0, 0], [4, 0, 0], [4, 2, 0], [4, 2, 0],
                    [4, 4, 0], [4, 4, 2], [4, 4, 2], [4, 4, 4], [4, 4, 4], [4, 4, 4]]
    for i, q in zip((0, 2, 4), qs):
        w = model[i].weight
        assert q.frozen.all() and torch.isin(w, q.centroids).all()
    # the same quantizer without layer_steps (SLQ) quantizes every layer at the same step
    slq = apply_qat(qat("slq", bits=2, schedule=[0.0, 1.0], stage_steps=2),
                    nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    assert [q.first_step() for q in (slq[0].parametrizations.weight[0],
                                     slq[1].parametrizations.weight[0])] == [0, 0]


@pytest.mark.parametrize("args,key", [
    ({"bits": 9}, "bits"), ({"schedule": [0.5, 0.25]}, "schedule"), ({"schedule": []}, "schedule"),
    ({"schedule": [1.5]}, "schedule"), ({"stage_steps": 0}, "stage_steps"),
    ({"start_step": -1}, "start_step"), ({"layer_steps": -1}, "layer_steps")])
def test_slq_config_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=rf"^qat\.default\.weight\.{key}: "):
        qat("slq", **args)


def test_ebp_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^qat\.default\.weight\.gain: "):
        qat("ebp", gain=0.0)


def test_slq_refuses_bn_folding():
    from dqt.train.models import LeNetCNN

    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="slq")),
                    keep_first_last=False, fold_bn=True)
    with pytest.raises(ValueError, match="qat.fold_bn"):
        apply_qat(cfg, LeNetCNN((1, 8, 8), [4, 6], 12, 10, batch_norm=True))


# ------------------------------------------------------------------ EBP
def monte_carlo(h, draws, gen):
    """Binary weights drawn from the posterior: +1 with probability (1 + tanh h)/2."""
    p = (1 + torch.tanh(h.double())) / 2
    u = torch.rand((draws, *h.shape), generator=gen, dtype=torch.float64)
    return torch.where(u < p, 1.0, -1.0).double()


def assert_moments_match(u, mu, var):
    """u: (draws, ...) samples of a pre-activation. The sample mean is within 5 standard errors
    (√(σ²/N)) of μ, and the sample variance within 5 standard errors (√((m4 − s⁴)/N), m4 the
    sample fourth central moment) of σ²: each entry fails by chance with probability about
    6e-7 (normal approximation), the whole test (< 200 entries, fixed seed) below 1e-4."""
    n = u.shape[0]
    m, s2 = u.mean(0), u.var(0)
    m4 = ((u - m) ** 4).mean(0)
    assert ((m - mu).abs() <= 5 * (var / n).sqrt()).all(), (m - mu).abs().max()
    assert ((s2 - var).abs() <= 5 * ((m4 - s2 ** 2).clamp(min=0) / n).sqrt()).all(), \
        (s2 - var).abs().max()
    assert (var > 0).all()


def test_ebp_linear_mean_and_variance_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 40, generator=g, dtype=torch.float64) * 1.5
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    mu, var = moments(x, h)
    w = monte_carlo(h, 20000, g)  # (N, 6, 40)
    u = torch.einsum("noi,bi->nbo", w, x)
    assert_moments_match(u, mu, var)
    # the CLT: with 40 inputs the pre-activation is close to Gaussian; P(u ≤ μ + zσ) ≈ Φ(z)
    # within 0.02 (the Berry-Esseen error for these weights plus 4 MC standard errors)
    for z in (-1.0, 0.0, 1.0):
        frac = (u <= mu + z * var.sqrt()).double().mean(0)
        phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
        assert ((frac - phi).abs() < 0.05).all(), (z, frac, phi)


def test_ebp_conv_mean_and_variance_match_monte_carlo():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    h = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    mu, var = moments(x, h, conv)
    w = monte_carlo(h, 20000, g)
    u = torch.stack([nn.functional.conv2d(x, wi, None, 2, 1)[0] for wi in w])  # (N, 3, 3, 3)
    assert mu.shape == (1, 3, 3, 3)
    assert_moments_match(u, mu[0], var[0])


def test_ebp_trains_the_mean_and_deploys_the_map_sign():
    q = make("ebp")
    h = torch.tensor([[-2.0, -0.3, 0.0, 0.4, 1.0]])
    assert torch.equal(q.train()(h), torch.tanh(h))  # training: the mean weight
    y = q.eval()(h)
    assert torch.equal(y, torch.tensor([[-1.0, -1.0, 1.0, 1.0, 1.0]]))  # sign(0) = +1
    codes = q.encode(h)
    assert isinstance(codes, Affine) and torch.equal(codes.decode(), y)


def test_ebp_natural_parameter_is_the_weight_over_its_initial_mean_magnitude():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    w0 = lin.weight.detach().clone()
    q = apply_qat(qat("ebp"), nn.Sequential(lin))[0].parametrizations.weight[0]
    assert float(q.s) == pytest.approx(float(w0.abs().mean()), rel=1e-6)
    torch.testing.assert_close(q.train()(w0), torch.tanh(w0 / w0.abs().mean()))
    three = apply_qat(qat("ebp", gain=3.0), nn.Sequential(nn.Linear(8, 4)))
    q3 = three[0].parametrizations.weight[0]
    w3 = three[0].parametrizations.weight.original.detach()
    torch.testing.assert_close(q3.train()(w3), torch.tanh(3 * w3 / w3.abs().mean()))
    assert torch.equal(q.eval()(w0), torch.where(w0 >= 0, 1.0, -1.0))
    mu, var = q.moments(torch.ones(1, 8), w0)
    torch.testing.assert_close(mu, torch.tanh(w0 / q.s).sum(1, keepdim=True).T)


def test_ebp_update_is_the_gradient_with_respect_to_the_mean_weight():
    """∂L/∂W = ∂L/∂⟨w⟩, computed on a plain tensor W̄ = tanh(W/s) — not the chain rule's
    ∂L/∂⟨w⟩·(1 − tanh² h)/s."""
    torch.manual_seed(0)
    model = apply_qat(qat("ebp"), nn.Sequential(nn.Linear(8, 4)))
    x, t = torch.randn(16, 8), torch.randn(16, 4)
    w = model[0].parametrizations.weight.original
    s = model[0].parametrizations.weight[0].s
    torch.nn.functional.mse_loss(model(x), t).backward()
    mean = torch.tanh(w.detach() / s).requires_grad_(True)
    out = nn.functional.linear(x, mean, model[0].bias.detach())
    torch.nn.functional.mse_loss(out, t).backward()
    torch.testing.assert_close(w.grad, mean.grad, rtol=1e-6, atol=0)
    chain = mean.grad * (1 - mean.detach() ** 2) / s
    assert not torch.allclose(w.grad, chain)


@pytest.mark.parametrize("overrides", [
    ["qat=slq", "qat.default.weight.stage_steps=6"], ["qat=ebp"]], ids=["slq", "ebp"])
def test_two_rank_run_keeps_parameters_identical(tmp_path, overrides):
    p = run_train("experiment=digits_cnn_bn", *overrides, "steps=40", "eval_every=0",
                  f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "params identical on all ranks: True" in (tmp_path / "train_rank0.log").read_text()
    s = summary(tmp_path)
    assert s["params_in_sync"] and s["eval/acc"] > 0.5

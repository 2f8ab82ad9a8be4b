"""ADMM low-bit weights (Leng et al., AAAI 2018): the code sets, the projection, one ADMM
iteration step by step (penalty gradient, G-step, dual step), the forward modes, checkpointed
state, a toy problem that converges onto the constraint set, and 2 ranks end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import checkpoints, run_train, summary
from dqt.errors import ConfigError
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.config import to_typed
from dqt.quant import apply_qat, qat_penalty, qat_step
from dqt.quant.methods.admm import code_set, project
from dqt.quant.prepare import weight_quantizer


def admm_layer(seed=0, **args):
    torch.manual_seed(seed)
    spec = QuantizerConfig(name="admm", **{"rho": 0.5, "every": 1, "iters": 5, **args})
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=spec), keep_first_last=False)
    return apply_qat(cfg, nn.Sequential(nn.Linear(12, 8)))


def test_code_sets():
    assert code_set(1) == [-1, 1]
    assert code_set(2) == [-1, 0, 1]
    assert code_set(3) == [-4, -2, -1, 0, 1, 2, 4]
    assert code_set(4) == [-64, -32, -16, -8, -4, -2, -1, 0, 1, 2, 4, 8, 16, 32, 64]


def test_projection_alternation_never_increases_the_distance():
    torch.manual_seed(0)
    v = torch.randn(40, 30) ** 3
    lv = torch.tensor(code_set(3))
    prev = None
    for iters in range(0, 6):
        codes, a = project(v, lv, iters)
        d = float((v - a * lv[codes]).pow(2).sum())
        if prev is not None:
            assert d <= prev * (1 + 1e-6)
        prev = d
    # the last step was the code step: each code is the nearest level of v/a
    nearest = (v[..., None] / a - lv).abs().min(dim=-1).values
    torch.testing.assert_close((v / a - lv[codes]).abs(), nearest)


def test_one_admm_iteration_step_by_step():
    model = admm_layer(rho=0.5)
    lin = model[0]
    q = weight_quantizer(lin)
    w = lin.parametrizations.weight.original
    g0 = q.projected().clone()
    assert torch.equal(q.lam, torch.zeros_like(w))
    # the training forward is the real W (the paper's W-step), eval uses G
    model.train()
    assert torch.equal(lin.weight, w)
    model.eval()
    assert torch.equal(lin.weight, g0)
    assert set(torch.unique(g0 / q.scale).tolist()) <= {-1.0, 0.0, 1.0}
    model.train()
    x = torch.randn(5, 12)
    model(x).square().sum().backward()
    loss_grad = w.grad.clone()
    with torch.no_grad():
        q.lam.copy_(torch.randn_like(q.lam) * 0.01)  # a nonzero dual, to see it in the formulas
    lam0 = q.lam.clone()
    qat_penalty(model)  # grad += ρ(W − G + λ)
    torch.testing.assert_close(w.grad, loss_grad + 0.5 * (w.detach() - g0 + lam0))
    with torch.no_grad():
        w.sub_(0.1 * w.grad)
    qat_step(model)  # G ← Proj(W + λ), λ ← λ + W − G
    codes, a = project(w.detach() + lam0, torch.tensor([-1.0, 0.0, 1.0]), 5)
    g1 = a * torch.tensor([-1.0, 0.0, 1.0])[codes]
    torch.testing.assert_close(q.projected(), g1)
    torch.testing.assert_close(q.lam, lam0 + w.detach() - g1)


def test_every_updates_g_only_every_k_steps_and_ste_variant():
    model = admm_layer(every=3)
    q = weight_quantizer(model[0])
    w = model[0].parametrizations.weight.original
    before = q.projected().clone()
    for step in range(1, 4):
        with torch.no_grad():
            w.mul_(1.7).add_(0.05)
        qat_step(model)
        assert torch.equal(q.projected(), before) == (step < 3), step
    ste = admm_layer(ste=True)
    lin = ste[0]
    lin.train()
    assert torch.equal(lin.weight, weight_quantizer(lin).projected())
    x = torch.randn(3, 12)
    g = torch.randn(3, 8)
    ste(x).backward(g)
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, g.t() @ x)


def test_state_is_checkpointed_and_reloads_to_the_same_projected_model():
    model = admm_layer(seed=0)
    w = model[0].parametrizations.weight.original
    for _ in range(3):
        model(torch.randn(4, 12)).sum().backward()
        qat_penalty(model)
        with torch.no_grad():
            w.sub_(0.1 * w.grad)
        w.grad = None
        qat_step(model)
    sd = model.state_dict()
    assert {"0.parametrizations.weight.0.lam", "0.parametrizations.weight.0.codes",
            "0.parametrizations.weight.0.scale", "0.parametrizations.weight.0.count"} <= set(sd)
    fresh = admm_layer(seed=1)
    fresh.load_state_dict(sd)
    x = torch.randn(6, 12)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_admm_converges_onto_the_ternary_set_on_least_squares():
    """min ½‖XW − Y‖² with W ternary: plain SGD W-steps + the ADMM penalty drive W − G → 0, and
    the projected G fits about as well as the best TWN-style ternarization of the solution."""
    torch.manual_seed(0)
    x = torch.randn(256, 12)
    w_true = torch.randint(-1, 2, (8, 12)).float() * 0.7
    y = x @ w_true.t()
    model = admm_layer(rho=1.0, every=5)
    w = model[0].parametrizations.weight.original
    with torch.no_grad():
        model[0].bias.zero_()
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD([w], lr=0.05)
    for _ in range(600):
        model.train()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        qat_penalty(model)
        opt.step()
        opt.zero_grad()
        qat_step(model)
    q = weight_quantizer(model[0])
    g = q.projected()
    assert float((w.detach() - g).abs().max()) < 0.02
    torch.testing.assert_close(g, w_true, atol=1e-3, rtol=0)


def test_fold_bn_and_bad_arguments_are_rejected(compose):
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="admm")),
                    keep_first_last=False, fold_bn=True)
    with pytest.raises(ValueError, match="admm: qat.fold_bn is not supported"):
        apply_qat(cfg, nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    for key, val, msg in [("rho", -1, "must be >= 0; got -1.0"),
                          ("every", 0, "must be >= 1; got 0"),
                          ("bits", 5, "must be in [1, 4]; got 5"),
                          ("iters", 0, "must be in [1, 100]; got 0")]:
        with pytest.raises(ConfigError) as e:
            to_typed(compose("qat=admm_ternary", f"qat.default.weight.{key}={val}"))
        assert str(e.value) == f"qat.default.weight.{key}: {msg}"


def _w_minus_g(state):
    """‖W − G‖/‖W‖ per ADMM layer of a checkpointed model (G = a·S[codes], ternary)."""
    out = []
    for k in state:
        if k.endswith(".lam"):
            p = k[: -len("0.lam")]
            g = state[p + "0.scale"] * torch.tensor([-1.0, 0.0, 1.0])[state[p + "0.codes"].long()]
            w = state[p + "original"]
            out.append(float((w - g).norm() / w.norm()))
    return out


@pytest.mark.slow
def test_two_ranks_keep_params_identical_and_the_trainer_applies_the_penalty(tmp_path):
    """2 ranks: params identical, the ADMM state checkpointed; the trainer's ``qat_penalty`` pulls
    W onto G (with ρ = 0 the distance stays at the ternarization error)."""
    rel = {}
    for rho in (1.0, 0.0):
        run = tmp_path / f"rho{rho}"
        p = run_train("experiment=digits_cnn_bn", "qat=admm_ternary", "steps=60", "eval_every=0",
                      "qat.default.weight.every=7", f"qat.default.weight.rho={rho}",
                      "checkpoint.every=30", f"hydra.run.dir={run}", nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "params identical on all ranks: True" in (run / "train_rank0.log").read_text()
        s = summary(run)
        assert s["params_in_sync"] is True
        state = torch.load(checkpoints(run)[-1] / "train.pt", weights_only=False)["model"]
        lam = [k for k in state if k.endswith(".lam")]
        assert lam and all(state[k].abs().sum() > 0 for k in lam)  # the dual moved: G-steps ran
        assert all(int(state[k.replace(".lam", ".count")]) == 60 for k in lam)
        rel[rho] = _w_minus_g(state)
    assert summary(tmp_path / "rho1.0")["eval/acc"] > 0.5
    assert all(a < 0.6 * b for a, b in zip(rel[1.0], rel[0.0])), rel

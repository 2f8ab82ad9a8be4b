"""dqt.optim.FrozenVarianceAdamW: AdamW (and Adam) until the freeze, a fixed variance after it,
coordinates whose variance is 0 learning at their tensor's mean rate, Adam's one-step bound
kept, exact state round trip —
and the trainer choosing it when a dqt codec compresses the gradients under adam/adamw."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dqt.optim import FrozenVarianceAdamW


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 16), nn.Tanh(), nn.Linear(16, 4))


def _step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(8, 9, generator=g), torch.randint(4, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("decoupled,ref_cls", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_before_the_freeze_it_is_adamw_or_adam(decoupled, ref_cls):
    a, b = _model(), _model()
    ours = FrozenVarianceAdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                               freeze_steps=50, decoupled=decoupled)
    ref = ref_cls(b.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    for k in range(6):
        _step(a, ours, k)
        _step(b, ref, k)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_variance_frozen_and_zero_variance_coordinates_learn_at_their_tensors_mean():
    model = _model()
    opt = FrozenVarianceAdamW(model.parameters(), lr=1e-2, freeze_steps=3)
    first = model[0].weight
    for k in range(3):  # input feature 0 is always zero during the freeze: its weights get
        g = torch.Generator().manual_seed(k)  # no gradient, v = 0
        x, y = torch.randn(8, 9, generator=g), torch.randint(4, (8,), generator=g)
        x[:, 0] = 0
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    v = opt.exp_avg_sq.clone()
    w = v[:first.numel()].view_as(first)
    assert (w[:, 0] == 0).all() and (w[:, 1:] > 0).all()
    column = first[:, 0].detach().clone()
    _step(model, opt, 3)  # feature 0 is active now: its gradient is non-zero
    assert torch.equal(opt.exp_avg_sq, v)  # v stays frozen (the state is not rewritten)
    g0 = first.grad[:, 0]
    # its denominator is √(mean v̂ of the tensor): the step is lr·(1−β1)·g/√mean / bc1
    vhat_mean = w.mean() / (1 - 0.999 ** 3)
    bc1 = 1 - 0.9 ** 4
    expected = column - 1e-2 * (0.1 * g0 / (vhat_mean.sqrt() + 1e-8)) / bc1
    torch.testing.assert_close(first[:, 0].detach(), expected, rtol=1e-5, atol=1e-7)
    for k in range(4, 8):
        _step(model, opt, k)
        assert torch.equal(opt.exp_avg_sq, v)


def test_step_bound_holds_for_a_coordinate_that_wakes_up_after_the_freeze():
    p = nn.Parameter(torch.zeros(4))
    opt = FrozenVarianceAdamW([p], lr=0.1, betas=(0.9, 0.999), freeze_steps=5)
    for _ in range(5):  # tiny gradients while v is estimated
        p.grad = torch.full((4,), 1e-6)
        opt.step()
    before = p.detach().clone()
    p.grad = torch.full((4,), 1e3)  # a billion times the frozen scale
    opt.step()
    bound = 1 / math.sqrt(1 - 0.999)  # the largest |g|/√v of Adam's own step: 31.6
    step = (before - p.detach()).abs()
    assert torch.allclose(step, torch.full((4,), 0.1 * bound))  # clamped, not 1e3/1e-6


def test_state_round_trips_exactly():
    a = _model()
    opt = FrozenVarianceAdamW(a.parameters(), lr=1e-2, freeze_steps=3)
    for k in range(5):
        _step(a, opt, k)
    b = copy.deepcopy(a)
    opt_b = FrozenVarianceAdamW(b.parameters(), lr=1e-2, freeze_steps=3)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in range(5, 9):
        _step(a, opt, k)
        _step(b, opt_b, k)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(opt.exp_avg, opt_b.exp_avg) and opt.step_count == opt_b.step_count == 9


@pytest.mark.parametrize("overrides,frozen", [
    (["optim=adamw", "+scheme=ternary_grad"], True),
    (["optim=adamw", "+scheme=qsgd"], True),
    (["optim=adamw", "+scheme=onebit"], True),
    (["optim=adamw", "+scheme=signsgd"], False),  # a vote: no gradient estimate to precondition
    (["optim=adamw", "+scheme=bf16"], False),
    (["optim=adamw"], False),
    (["optim=sgd", "+scheme=ternary_grad"], False),
    (["optim=adamw", "+scheme=ternary_grad", "optim.freeze_variance=false"], False)])
def test_the_trainer_freezes_adams_variance_under_a_codec(compose, overrides, frozen):
    from dqt.config import to_typed
    from dqt.train.trainer import _scheme_warm_up, build_optimizer

    cfg = to_typed(compose(*overrides, "optim.freeze_steps=30"))
    assert cfg.frozen_variance == frozen
    opt = build_optimizer(cfg.optim, _model(), cfg.qat, freeze=cfg.frozen_variance)
    assert isinstance(opt, FrozenVarianceAdamW) == frozen
    if frozen:  # the scheme's uncompressed warm-up covers the steps that estimate v
        assert opt.freeze_steps == 30 and _scheme_warm_up(cfg).warmup_steps == 30
    elif cfg.scheme is not None and hasattr(cfg.scheme, "warmup_steps"):
        assert _scheme_warm_up(cfg).warmup_steps == cfg.scheme.warmup_steps == 0

"""Quantizer parameters in their own optimizer param group (``qat.quantizer_lr_mult``,
``qat.quantizer_weight_decay``): which parameters are quantizer parameters, the groups the
trainer builds (lr, weight decay, the LR schedule), and TTQ's W_p/W_n staying bounded on a toy
problem with the preset's multiplier while they run away at the weights' own learning rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dqt.quant.config import QATConfig, QATRuleConfig, QATSlotsConfig, QuantizerConfig
from dqt.config import OptimConfig, to_typed
from dqt.quant import apply_qat, quantizer_parameters
from dqt.train.trainer import build_optimizer, lr_factor


def mixed_model(**qat_kw) -> tuple[nn.Module, QATConfig]:
    """TTQ weights on layer 2, LSQ weights + PACT input on layer 4 (first/last layer fp32)."""
    cfg = QATConfig(name="t", rules=[
        QATRuleConfig(match="2", weight=QuantizerConfig(name="ttq")),
        QATRuleConfig(match="4", weight=QuantizerConfig(name="lsq", bits=4),
                      act=QuantizerConfig(name="pact", bits=4))], **qat_kw)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return apply_qat(cfg, net), cfg


def test_quantizer_parameters_are_the_ones_quantizers_own():
    net, _ = mixed_model()
    names = [n for n, _ in quantizer_parameters(net)]
    assert names == ["2.parametrizations.weight.0.w_p", "2.parametrizations.weight.0.w_n",
                     "4.parametrizations.weight.0.s", "4.input_quantizer.alpha"]
    # the layers' own (latent) weights, biases and BN are not quantizer parameters
    assert not any(n.endswith(("original", "bias")) or n.startswith("5.") for n in names)


def test_param_groups_split_lr_and_weight_decay():
    net, cfg = mixed_model(quantizer_lr_mult=0.01, quantizer_weight_decay=0.0)
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.2, weight_decay=5e-4), net, cfg)
    model_g, quant_g = opt.param_groups
    assert (model_g["name"], quant_g["name"]) == ("model", "quantizer")
    q_ids = {id(p) for _, p in quantizer_parameters(net)}
    assert {id(p) for p in quant_g["params"]} == q_ids
    assert not q_ids & {id(p) for p in model_g["params"]}
    assert len(model_g["params"]) + len(quant_g["params"]) == len(list(net.parameters()))
    assert model_g["lr"] == 0.2 and model_g["weight_decay"] == 5e-4
    assert quant_g["lr"] == pytest.approx(0.2 * 0.01) and quant_g["weight_decay"] == 0.0
    # the LR schedule scales both groups alike: the ratio stays quantizer_lr_mult
    ocfg = OptimConfig(name="adamw", lr=0.1, warmup_steps=2)
    opt = build_optimizer(ocfg, net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(ocfg, s, 10))
    for _ in range(5):
        opt.step(), sched.step()
    lrs = sched.get_last_lr()
    assert lrs[1] == pytest.approx(0.01 * lrs[0]) and lrs[0] < 0.1


def test_quantizer_weight_decay_is_applied_to_the_quantizer_group():
    net, cfg = mixed_model(quantizer_weight_decay=1e-3)
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=0.0), net, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 1e-3]
    assert opt.param_groups[1]["lr"] == 0.1  # quantizer_lr_mult defaults to 1


def test_no_quantizer_parameters_means_one_group():
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="twn")),
                    quantizer_lr_mult=0.01)
    net = apply_qat(cfg, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)))
    opt = build_optimizer(OptimConfig(), net, cfg)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 6
    assert len(build_optimizer(OptimConfig(), net).param_groups) == 1  # no qat config at all


def test_ttq_preset_sets_the_multiplier(compose):
    cfg = to_typed(compose("qat=ttq"))
    assert cfg.qat.quantizer_lr_mult == 0.001 and cfg.qat.quantizer_weight_decay == 0.0
    assert to_typed(compose("qat=w8a8")).qat.quantizer_lr_mult == 1.0


def _ttq_toy(mult: float, steps: int = 40) -> tuple[float, list[tuple[float, float]], float]:
    """A 3-layer net with TTQ on the 128×128 middle layer (+ BN), SGD lr 0.05 momentum 0.9, on a
    linear-teacher classification task; returns (W_p at init, [(W_p, W_n)] per step, accuracy)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 32, generator=g)
    y = (x @ torch.randn(32, 10, generator=g)).argmax(1)
    cfg = QATConfig(name="ttq", default=QATSlotsConfig(weight=QuantizerConfig(name="ttq")),
                    quantizer_lr_mult=mult)
    net = apply_qat(cfg, nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128),
                                       nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)))
    opt = build_optimizer(OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-4), net, cfg)
    q = net[2].parametrizations.weight[0]
    init, hist = float(q.w_p.detach()), []
    for _ in range(steps):
        i = torch.randint(0, 512, (64,), generator=g)
        F.cross_entropy(net(x[i]), y[i]).backward()
        opt.step(), opt.zero_grad()
        hist.append((float(q.w_p.detach()), float(q.w_n.detach())))
    with torch.no_grad():
        acc = (net.eval()(x).argmax(1) == y).float().mean().item()
    return init, hist, acc


@pytest.mark.parametrize("mult", [0.01, 0.001])  # 0.001: the ttq preset's
def test_ttq_scales_stay_bounded_with_their_own_lr_and_run_away_without(mult):
    init, hist, acc = _ttq_toy(mult)
    values = [v for h in hist for v in h]
    assert min(values) > 0 and max(values) < 5 * init, (init, min(values), max(values))
    assert values != [init] * len(values)  # they do train
    assert acc > 0.8
    # the paper's Σ-gradient at the weights' lr: W_p/W_n leave the weights' scale (sign flips)
    init, hist, _ = _ttq_toy(1.0, steps=10)
    values = [v for h in hist for v in h]
    assert min(values) < 0 or max(values) > 5 * init, (init, min(values), max(values))

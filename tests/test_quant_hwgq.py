"""HWGQ (Cai et al., CVPR 2017): the Lloyd levels against the paper's constant and an
independent numerical optimum, the half-wave quantizer on a BN CNN, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm

from dqt.errors import ConfigError
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.config import to_typed
from dqt.quant import QUANTIZERS, apply_qat
from dqt.quant.methods.hwgq import half_gaussian_mse, hwgq_levels
from dqt.train.models import LeNetCNN


def test_uniform_2bit_step_is_the_papers_0_538():
    step = hwgq_levels(2)[0]
    assert abs(step - 0.538) < 1e-3, step
    assert hwgq_levels(2) == pytest.approx((step, 2 * step, 3 * step), abs=1e-12)


def test_one_bit_level_is_the_half_normal_mean():
    # a single positive level: the centroid of (0, ∞) = E[x | x > 0] = √(2/π)
    assert hwgq_levels(1, True)[0] == pytest.approx(math.sqrt(2 / math.pi), abs=1e-10)
    assert hwgq_levels(1, False)[0] == pytest.approx(math.sqrt(2 / math.pi), abs=1e-10)


@pytest.mark.parametrize("bits", [2, 3])
def test_nonuniform_levels_are_lloyd_max_fixed_points(bits):
    """Each level is the centroid of its cell (scipy quadrature, not the module's moments), and
    beats the uniform quantizer and small perturbations of itself in MSE."""
    lv = list(hwgq_levels(bits, uniform=False))
    t = [0.0] + [(a + b) / 2 for a, b in zip(lv, lv[1:])] + [math.inf]
    for q, a, b in zip(lv, t, t[1:]):
        mass = quad(norm.pdf, a, b)[0]
        centroid = quad(lambda x: x * norm.pdf(x), a, b)[0] / mass
        assert q == pytest.approx(centroid, abs=1e-7)
    mse = half_gaussian_mse(lv)
    assert mse < half_gaussian_mse(list(hwgq_levels(bits, uniform=True)))
    for i in range(len(lv)):
        for d in (-1e-3, 1e-3):
            moved = lv.copy()
            moved[i] += d
            assert half_gaussian_mse(moved) > mse


def test_mse_formula_matches_quadrature():
    lv = [0.3, 1.0, 1.9]
    t = [0.0, 0.65, 1.45, math.inf]
    ref = sum(quad(lambda x, q=q: (x - q) ** 2 * norm.pdf(x), a, b)[0]
              for q, a, b in zip(lv, t, t[1:]))
    assert half_gaussian_mse(lv) == pytest.approx(ref, abs=1e-10)


def test_hwgq_on_a_bn_cnn_quantizes_every_hidden_input_to_the_levels():
    torch.manual_seed(0)
    cfg = QATConfig(name="t", default=QATSlotsConfig(act=QuantizerConfig(name="hwgq", bits=2)))
    model = apply_qat(cfg, LeNetCNN((1, 8, 8), [4, 6], 12, 10, batch_norm=True))
    seen = []
    for m in model.modules():
        if hasattr(m, "input_quantizer"):
            m.register_forward_hook(lambda mod, a, out: seen.append(mod.input_quantizer(a[0])))
    x = torch.randn(16, 1, 8, 8)
    model(x).square().mean().backward()
    levels = QUANTIZERS.get("hwgq")("act", bits=2).levels
    assert seen and all(torch.isin(s, levels).all() for s in seen)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


def test_bad_arguments_name_the_key(compose):
    with pytest.raises(ConfigError) as e:
        to_typed(compose("qat=hwgq", "qat.default.act.bits=0"))
    assert str(e.value) == "qat.default.act.bits: must be in [1, 8]; got 0"
    with pytest.raises(ConfigError, match="hwgq quantizes act, not weight"):
        QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="hwgq")))

"""Balanced quantization (Zhou et al., JCST 2017): equal-population bins from the recursive
median partition, the cheap mean split, uniform levels, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqt.errors import ConfigError
from dqt.config import to_typed
from dqt.quant import QUANTIZERS
from dqt.quant.methods.balanced import balanced_edges


def make(**args):
    return QUANTIZERS.get("balanced")("weight", **args)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_median_bins_are_the_rank_blocks(bits):
    """N = 2^k·m distinct weights: bin i holds exactly ranks [i·m, (i+1)·m) — every level used by
    the same number of weights (the point of the method), whatever the distribution's shape."""
    torch.manual_seed(bits)
    n = 1 << bits
    w = torch.randn(n * 6, 5) ** 3  # heavy-tailed: uniform quantization would crowd the middle
    q = make(bits=bits)
    c, _, _ = q.codes(w)
    ranks = w.reshape(-1).argsort().argsort().reshape(w.shape)
    assert torch.equal(c, ranks // (w.numel() // n))
    y = q(w)
    vals, counts = y.unique(return_counts=True)
    assert len(vals) == n and (counts == w.numel() // n).all()


def test_levels_are_uniform_and_symmetric_with_least_squares_scale():
    torch.manual_seed(0)
    w = torch.randn(32, 8) * 0.2 + 0.05
    y = make(bits=3)(w).reshape(-1)
    vals = y.unique()
    steps = vals[1:] - vals[:-1]
    torch.testing.assert_close(steps, steps[0].expand_as(steps))
    torch.testing.assert_close(vals, -vals.flip(0))  # (2c + 1 − 2^k)·α/2^k
    # α is least squares for those levels: ⟨w − y, y⟩ = 0
    assert abs(float((w.reshape(-1) - y) @ y)) < 1e-4 * float(y @ y)


def test_mean_split_is_the_recursive_mean_and_differs_from_the_median_on_skewed_weights():
    w = torch.tensor([0.0, 0.1, 0.2, 0.3, 10.0, 11.0, 12.0, 30.0])
    # mean 7.95 splits {0, .1, .2, .3} | {10, 11, 12, 30}; means .15 and 15.75 split those
    torch.testing.assert_close(balanced_edges(w, 2, "mean"),
                               torch.tensor([0.15, 7.95, 15.75]))
    # medians: 5.15, then 0.15 and 11.5
    torch.testing.assert_close(balanced_edges(w, 2, "median"), torch.tensor([0.15, 5.15, 11.5]))
    x = torch.randn(4000).exp()  # log-normal: mean > median
    assert float(balanced_edges(x, 1, "mean")[0]) > float(balanced_edges(x, 1, "median")[0])
    np.testing.assert_allclose(float(balanced_edges(x, 1, "median")[0]),
                               np.median(x.numpy()), rtol=1e-6)


def test_identity_ste_and_export_match():
    w = torch.randn(6, 10, requires_grad=True)
    q = make(bits=2)
    g = torch.randn(6, 10)
    q(w).backward(g)
    assert torch.equal(w.grad, g)
    c = q.encode(w.detach())
    assert torch.equal(c.decode().reshape(w.shape), q(w.detach()))


def test_bad_arguments_name_the_key(compose):
    with pytest.raises(ConfigError) as e:
        to_typed(compose("qat=balanced_w2", "qat.default.weight.approx=histogram"))
    assert str(e.value) == "qat.default.weight.approx: must be one of median, mean; got 'histogram'"
    with pytest.raises(ConfigError) as e:
        to_typed(compose("qat=balanced_w2", "qat.default.weight.bits=9"))
    assert str(e.value) == "qat.default.weight.bits: must be in [1, 8]; got 9"

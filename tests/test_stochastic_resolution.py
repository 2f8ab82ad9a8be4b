"""The resolution of stochastic rounding: 16-bit uniforms round with probability within 2⁻¹⁷ of
the exact one, so rounding probabilities of a few 2⁻¹⁶ are kept — which an 8-bit uniform would
not. The rate at which small values round up is checked against a binomial tolerance over
2²¹–2²² draws (many blocks, i.e. counters, and keys), and the test computes that the 8-bit
rule's expectation lies outside that tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from dqt.kernels import blockq
from dqt.kernels.blockq import BlockSpec, linear_table
from dqt.kernels.philox import mix_seed

# the C kernel when it builds (the reference otherwise); every implementation gives the same
# bytes (tests/test_kernels_blockq.py), so the statistics are those of each of them
IMPLS = ["c" if "c" in blockq.available_impls("cpu") else "reference"]
BLOCKS, KEYS = 1 << 17, 16  # 2¹⁷ blocks (counters) per call, 16 keys: 2²¹ blocks in all
SMALL_K = [1, 1, 2, 2, 4, 4, 8]  # the 7 small values of a block: rounding probability k·2⁻¹⁶
Z = 5.0  # tolerance: 5 binomial standard deviations


def _p_uniform(p: float, bits: int, midpoint: bool) -> float:
    """P(u < p) for u on a grid of 2^bits values: cell midpoints (m + ½)·2^-bits (this format)
    or left ends m·2^-bits."""
    cells = 1 << bits
    off = 0.5 if midpoint else 0.0
    return sum(1 for m in range(cells) if (m + off) / cells < p) / cells


def _tolerance(n: int, p: float) -> float:
    return Z * math.sqrt(n * p * (1 - p))


def _rounded_up_counts(spec: BlockSpec, big: float, small_of_k, impl: str) -> dict[int, int]:
    """Blocks of 8: one value `big` (which fixes the scale exactly) and 7 small values; the
    number of small values of each k rounded up (ternary: kept; qsgd: level 1), over all
    blocks and keys."""
    x = torch.tensor([big] + [small_of_k(k) for k in SMALL_K], dtype=torch.float32)
    x = x.repeat(BLOCKS)
    table, nbytes = linear_table(spec, x.numel())
    counts = dict.fromkeys(SMALL_K, 0)
    ks = torch.tensor(SMALL_K)
    for t in range(KEYS):
        msg = torch.zeros(nbytes, dtype=torch.uint8)
        blockq.encode(spec, x, table, msg, key=mix_seed(2026, t), impl=impl)
        # every block's scale is the one the construction relies on
        scales = msg[:4 * BLOCKS].view(torch.float32)
        assert torch.all(scales == big)
        out = torch.empty_like(x)
        blockq.decode(spec, msg, table, out, impl=impl)
        up = (out.view(BLOCKS, 8)[:, 1:] != 0).sum(0)
        for k in counts:
            counts[k] += int(up[ks == k].sum())
    return counts


def _check(counts: dict[int, int]) -> None:
    draws_per_slot = BLOCKS * KEYS
    for k in sorted(set(SMALL_K)):
        n = draws_per_slot * SMALL_K.count(k)
        p = k / 2**16
        # the format's probability is exactly k·2⁻¹⁶: k is a multiple of 2⁻¹⁶, no rounding
        assert _p_uniform(p, 16, midpoint=True) == p
        tol = _tolerance(n, p)
        assert abs(counts[k] - n * p) <= tol, (k, counts[k], n * p, tol)
        # an 8-bit uniform's expectation lies outside that tolerance, either rule
        for midpoint in (True, False):
            assert abs(n * _p_uniform(p, 8, midpoint) - n * p) > tol


@pytest.mark.parametrize("impl", IMPLS)
def test_ternary_keeps_values_of_probability_k_over_2_16(impl):
    """s = max|v| = 1, so keep = (u < |v|) exactly: |v| = k·2⁻¹⁶ is kept with probability
    k·2⁻¹⁶ (decode ±1), and E[decode] = v."""
    spec = BlockSpec("ternary", 8, 2, "fp32")
    _check(_rounded_up_counts(spec, 1.0, lambda k: k * 2.0**-16, impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_qsgd_rounds_up_with_probability_k_over_2_16(impl):
    """L = 1, ν = ‖v‖ = 2 exactly (Σ small² < 2⁻²¹ does not move fp32(√(4 + Σ small²))), so
    ℓ = |v|·½ = k·2⁻¹⁶ exactly, and level 1 comes with probability k·2⁻¹⁶."""
    spec = BlockSpec("qsgd", 8, 2, "fp32", levels=1)
    assert sum((k * 2.0**-15) ** 2 for k in SMALL_K) < 2.0**-21
    _check(_rounded_up_counts(spec, 2.0, lambda k: k * 2.0**-15, impl))


def test_the_bias_bound():
    """P(u < p) = ⌈p·2¹⁶ − ½⌉·2⁻¹⁶, so |P(u < p) − p| ≤ 2⁻¹⁷ for every threshold p, attained
    at p = 2⁻¹⁷; 8-bit uniforms are off by up to 2⁻⁹."""
    cells = 2**16
    for p in [0.0, 2.0**-17, 3 * 2.0**-18, 1 / 3, 0.5, 1 - 2.0**-17, 1.0]:
        assert _p_uniform(p, 16, True) == min(max(math.ceil(p * cells - 0.5), 0), cells) / cells
    for i in range(0, 2**22 + 1, 61):
        p = i / 2**22
        assert abs(min(max(math.ceil(p * cells - 0.5), 0), cells) / cells - p) <= 2.0**-17
    assert _p_uniform(2.0**-17, 16, True) == 0.0  # bias 2⁻¹⁷
    assert _p_uniform(2.0**-9, 8, True) == 0.0  # bias 2⁻⁹

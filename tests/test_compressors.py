"""dqt.comm.compressors, parametrized over the registry (a newly registered compressor with no
entry in VARIANTS / GOLDEN fails here until it is given settings and golden bytes):

* golden message bytes for a fixed tiny input and fixed uniforms, worked out by hand below;
* exact sizes, exact sign-scheme decodes, encode_decode == decode(encode) bit for bit;
* the seed contract, unbiasedness of the stochastic schemes, error-feedback telescoping,
  compression ratios, non-finite propagation, option validation, mix_seed.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from dqt.comm.compressors import COMPRESSORS, build_compressor, mix_seed

# Settings per registered scheme: variant id -> (scheme name, options).
VARIANTS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "onebit": {"onebit": ("onebit", {})},
    "ef_signsgd": {"ef_signsgd": ("ef_signsgd", {})},
    "signsgd": {"signsgd": ("signsgd", {})},
    "ternary_grad": {"ternary_grad": ("ternary_grad", {}),
                     "ternary_grad/base3": ("ternary_grad", {"format": "base3"})},
    "qsgd": {"qsgd/2": ("qsgd", {"bits": 2}), "qsgd/4": ("qsgd", {"bits": 4}),
             "qsgd/8": ("qsgd", {"bits": 8})},
}


def _variant_params() -> list[Any]:
    out = []
    for name in COMPRESSORS.names():
        for vid in VARIANTS.get(name, {name: None}):
            out.append(pytest.param(vid, id=vid))
    return out


ALL = _variant_params()


def make(vid: str, **extra: Any):
    name = vid.split("/")[0]
    if vid not in VARIANTS.get(name, {}):
        pytest.fail(f"compressor '{name}' is registered but has no test settings in VARIANTS")
    name, options = VARIANTS[name][vid]
    return build_compressor(name, **{**options, **extra})


def test_every_registered_compressor_has_settings():
    assert set(COMPRESSORS.names()) == set(VARIANTS)


# ----------------------------------------------------------------------------- golden bytes
# x in three blocks of 4 (the last partial): [3,-4,0,-0] [2,-1,-2,4] [-1.5,2];
# fixed uniforms u (Bernoulli(p) is u < p).
X = [3.0, -4.0, 0.0, -0.0, 2.0, -1.0, -2.0, 4.0, -1.5, 2.0]
U = [0.25, 0.75, 0.5, 0.1, 0.9, 0.3, 0.2, 0.7, 0.5, 0.95]
F_1_75 = [0x00, 0x00, 0xE0, 0x3F]  # fp32 1.75 = 0x3FE00000, little-endian
F_2_25 = [0x00, 0x00, 0x10, 0x40]  # 0x40100000
F_1_95 = [0x9A, 0x99, 0xF9, 0x3F]  # fp32(1.95) = 0x3FF9999A (0.95·2²³ = 7969177.6 → …9A)
F_2 = [0x00, 0x00, 0x00, 0x40]
F_2_5 = [0x00, 0x00, 0x20, 0x40]
F_4 = [0x00, 0x00, 0x80, 0x40]
F_5 = [0x00, 0x00, 0xA0, 0x40]

GOLDEN: dict[str, tuple[dict[str, Any], list[int], list[float]]] = {
    # a = mean|x| per block: 7/4, 9/4, 3.5/2 (the partial block averages its 2 real values),
    # sent as bf16 (onebit's default): 1.75 = 0x3FE0, 2.25 = 0x4010, little-endian;
    # bits x >= 0 (-0.0 >= 0): 1,0,1,1, 1,0,0,1 | 0,1 -> 0x9D, 0x02
    "onebit": ({"block_size": 4}, [0xE0, 0x3F, 0x10, 0x40, 0xE0, 0x3F, 0x9D, 0x02],
               [1.75, -1.75, 1.75, 1.75, 2.25, -2.25, -2.25, 2.25, -1.75, 1.75]),
    # one block: ||x||_1 / d = 19.5 / 10
    "ef_signsgd": ({}, F_1_95 + [0x9D, 0x02], [v * 1.95 for v in [1, -1, 1, 1, 1, -1, -1, 1, -1, 1]]),
    "signsgd": ({}, [0x9D, 0x02], [1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0]),
    # s = max|x| = 4, 4, 2; p = |x|/s = .75 1 0 0 | .5 .25 .5 1 | .75 1
    # kept (u < p): T T F F | F F T T | T T; codes t+1 = 2 0 1 1 | 1 1 0 2 | 0 2
    # 2bit: 2+0·4+1·16+1·64 = 0x52, 1+1·4+0+2·64 = 0x85, 0+2·4 = 0x08
    "ternary_grad": ({"block_size": 4}, F_4 + F_4 + F_2 + [0x52, 0x85, 0x08],
                     [4.0, -4.0, 0.0, 0.0, 0.0, 0.0, -4.0, 4.0, -2.0, 2.0]),
    # base3: 2+0+9+27+81 = 119 = 0x77, 1+0+18+0+162 = 181 = 0xB5
    "ternary_grad/base3": ({"block_size": 4}, F_4 + F_4 + F_2 + [0x77, 0xB5],
                           [4.0, -4.0, 0.0, 0.0, 0.0, 0.0, -4.0, 4.0, -2.0, 2.0]),
    # nu = 5, 5, 2.5; |x|/nu = .6 .8 0 0 | .4 .2 .4 .8 | .6 .8
    # bits=2 (L=1): levels 1 1 0 0 | 0 0 1 1 | 1 0; codes 2L+[x<0] = 2 3 0 0 | 0 1 3 2 | 3 0
    # -> 2+3·4 = 0x0E, 0+1·4+3·16+2·64 = 0xB4, 0x03
    "qsgd/2": ({"block_size": 4}, F_5 + F_5 + F_2_5 + [0x0E, 0xB4, 0x03],
               [5.0, -5.0, 0.0, 0.0, 0.0, -0.0, -5.0, 5.0, -2.5, 0.0]),
    # bits=4 (L=7): l = 4.2 5.6 0 0 | 2.8 1.4 2.8 5.6 | 4.2 5.6; u < frac:
    # F F - - | F T T F | F F -> levels 4 5 0 0 | 2 2 3 5 | 4 5
    # codes 8 11 0 0 | 4 5 7 10 | 9 10 -> 0xB8, 0x00, 0x54, 0xA7, 0xA9
    "qsgd/4": ({"block_size": 4}, F_5 + F_5 + F_2_5 + [0xB8, 0x00, 0x54, 0xA7, 0xA9],
               [5 * 4 / 7, -5 * 5 / 7, 0, 0, 5 * 2 / 7, -5 * 2 / 7, -5 * 3 / 7, 5 * 5 / 7,
                -2.5 * 4 / 7, 2.5 * 5 / 7]),
    # bits=8 (L=127): l = 76.2 101.6 0 0 | 50.8 25.4 50.8 101.6 | 76.2 101.6; u < frac:
    # F F - - | F T T F | F F -> levels 76 101 0 0 | 50 26 51 101 | 76 101
    # codes 152 203 0 0 | 100 53 103 202 | 153 202
    "qsgd/8": ({"block_size": 4}, F_5 + F_5 + F_2_5 + [0x98, 0xCB, 0x00, 0x00, 0x64, 0x35, 0x67,
                                                       0xCA, 0x99, 0xCA],
               [5 * 76 / 127, -5 * 101 / 127, 0, 0, 5 * 50 / 127, -5 * 26 / 127, -5 * 51 / 127,
                5 * 101 / 127, -2.5 * 76 / 127, 2.5 * 101 / 127]),
}


@pytest.mark.parametrize("vid", ALL)
def test_golden_message(vid):
    if vid not in GOLDEN:
        pytest.fail(f"no golden message for compressor variant '{vid}'")
    options, expected, decoded = GOLDEN[vid]
    comp = make(vid, **options)
    x, u = torch.tensor(X), torch.tensor(U)
    buf = comp.encode(x, seed=123, rand=u)
    assert buf.dtype == torch.uint8 and buf.tolist() == expected
    assert comp.wire_nbytes(len(X)) == len(expected)
    out = comp.decode(buf, len(X))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(decoded), rtol=1e-6, atol=0)
    buf2, out2 = comp.encode_decode(x, seed=123, rand=u)
    assert torch.equal(buf2, buf) and torch.equal(out2, out)


def test_seed_is_the_documented_draw():
    """encode(x, seed) uses torch.rand(n, generator=Generator().manual_seed(seed))."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))
    for vid in ("ternary_grad", "ternary_grad/base3", "qsgd/4"):
        comp = make(vid, block_size=64)
        u = torch.rand(300, generator=torch.Generator().manual_seed(99))
        assert torch.equal(comp.encode(x, 99), comp.encode(x, 0, rand=u))


# ----------------------------------------------------------------------------- sizes, exactness
SIZES = [0, 1, 2, 3, 5, 7, 8, 9, 31, 63, 64, 65, 100, 127, 128, 129, 1000, 2049]


@pytest.mark.parametrize("vid", ALL)
@pytest.mark.parametrize("block_size", [None, 0, 7, 64])
def test_wire_nbytes_and_round_trip(vid, block_size):
    comp = make(vid) if block_size is None else make(vid, block_size=block_size)
    g = torch.Generator().manual_seed(1)
    for n in SIZES:
        x = torch.randn(n, generator=g)
        buf, dec = comp.encode_decode(x, seed=n)
        assert buf.dtype == torch.uint8 and buf.numel() == comp.wire_nbytes(n)
        assert torch.equal(comp.encode(x, seed=n), buf)
        out = comp.decode(buf, n)
        assert out.shape == (n,) and out.dtype == torch.float32
        assert torch.equal(out, dec)  # encode_decode's decode is decode's, bit for bit
        # decoding from a misaligned slice of a bigger receive buffer
        shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), buf])[1:]
        assert torch.equal(comp.decode(shifted, n), dec)


def test_wire_nbytes_formulas():
    n = 1000
    assert build_compressor("onebit", block_size=64).wire_nbytes(n) == 2 * 16 + 125  # bf16
    assert build_compressor("onebit", block_size=64, scale_dtype="fp32").wire_nbytes(n) == 4 * 16 + 125
    assert build_compressor("ef_signsgd").wire_nbytes(n) == 4 + 125
    assert build_compressor("signsgd").wire_nbytes(n) == 125
    assert build_compressor("ternary_grad", block_size=64).wire_nbytes(n) == 64 + 250
    assert build_compressor("ternary_grad", block_size=64, format="base3").wire_nbytes(n) == 64 + 200
    for k in range(2, 9):
        assert build_compressor("qsgd", block_size=64, bits=k).wire_nbytes(n) == 64 + -(-n * k // 8)
    for vid in [v.values[0] for v in ALL]:
        assert make(vid).wire_nbytes(0) == 0


@pytest.mark.parametrize("vid", ["onebit", "ef_signsgd", "signsgd"])
@pytest.mark.parametrize("block_size", [None, 0, 64, 100])
def test_sign_schemes_decode_is_the_formula(vid, block_size):
    comp = make(vid) if block_size is None else make(vid, block_size=block_size)
    n = 1000
    x = torch.randn(n, generator=torch.Generator().manual_seed(5))
    x[::97] = 0.0
    out = comp.decode(comp.encode(x, seed=0), n)
    sign = torch.where(x >= 0, 1.0, -1.0)
    if vid == "signsgd":
        assert torch.equal(out, sign)
        return
    bs = comp.block_size or n
    expected = torch.empty(n)
    for start in range(0, n, bs):  # the reference, one block at a time
        blk = x[start:start + bs]
        scale = (blk.abs().sum(dtype=torch.float64) / blk.numel()).float()  # fp64 accumulation
        scale = scale.to(comp.scale_dtype).float()  # as sent (bf16 for onebit)
        expected[start:start + bs] = scale * sign[start:start + bs]
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- randomness
STOCHASTIC = ["ternary_grad", "ternary_grad/base3", "qsgd/2", "qsgd/4", "qsgd/8"]


@pytest.mark.parametrize("vid", ALL)
def test_reproducible_from_seed(vid):
    comp = make(vid, block_size=64)
    x = torch.randn(256, generator=torch.Generator().manual_seed(2))
    a, b = comp.encode(x, seed=11), comp.encode(x, seed=11)
    assert torch.equal(a, b)
    if comp.biased and vid not in STOCHASTIC:  # deterministic: the seed plays no part
        assert torch.equal(comp.encode(x, seed=12), a)
    else:
        assert vid in STOCHASTIC, "an unbiased compressor must be listed in STOCHASTIC"
        assert not torch.equal(comp.encode(x, seed=12), a)


@pytest.mark.parametrize("vid", STOCHASTIC)
def test_unbiased(vid):
    """E[decode(encode(x))] = x. Each decoded value is s·Bernoulli (ternary: σ ≤ s/2 with
    s = max|x| of its block) or ν/L·(⌊ℓ⌋ + Bernoulli) (qsgd: σ ≤ ν/(2L)); over T seeds the
    mean is within 5σ/√T of x for every element (a 5-sigma bound per element)."""
    trials, bs = 2000, 16
    comp = make(vid, block_size=bs)
    assert comp.biased is False
    x = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.01
    x[5] = 0.0
    acc = torch.zeros(64, dtype=torch.float64)
    for t in range(trials):
        acc += comp.decode(comp.encode(x, seed=mix_seed(77, t)), 64).double()
    mean = acc / trials
    blocks = x.view(-1, bs)
    if vid.startswith("ternary"):
        sigma = blocks.abs().amax(1, keepdim=True) / 2
    else:
        sigma = torch.linalg.vector_norm(blocks, dim=1, keepdim=True) / (2 * comp.levels)
    tol = (5 * sigma / math.sqrt(trials)).expand(-1, bs).reshape(-1).double()
    err = (mean - x.double()).abs()
    assert torch.all(err <= tol + 1e-7), f"max err/tol {float((err / tol).max()):.2f}"
    assert mean[5] == 0.0


def test_ternary_base3_decodes_like_2bit():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(4))
    two, three = make("ternary_grad", block_size=100), make("ternary_grad/base3", block_size=100)
    for seed in range(5):
        b2, b3 = two.encode(x, seed), three.encode(x, seed)
        assert b3.numel() < b2.numel()
        assert torch.equal(two.decode(b2, 1001), three.decode(b3, 1001))
        assert torch.equal(b2[:4 * 11], b3[:4 * 11])  # the same scales


def test_ternary_clipping():
    x = torch.tensor([1.0, -1.0] * 31 + [0.5, 100.0])
    comp = build_compressor("ternary_grad", block_size=0, clip_sigma=2.5)
    assert comp.biased is True
    sigma = float(x.std(unbiased=False))
    s = comp.encode(x, 0)[:4].view(torch.float32)
    assert math.isclose(float(s), 2.5 * sigma, rel_tol=1e-5)
    out = comp.decode(comp.encode(x, 0), x.numel())
    assert float(out.abs().max()) <= 2.5 * sigma * (1 + 1e-5)
    # clip_sigma = 0 is plain TernGrad: s = max|x|
    assert float(build_compressor("ternary_grad", block_size=0).encode(x, 0)[:4].view(torch.float32)) == 100.0


# ----------------------------------------------------------------------------- ratios
def test_compression_ratio():
    n, fp32 = 2**20, 4 * 2**20
    assert build_compressor("onebit", block_size=2048).wire_nbytes(n) <= fp32 / 30
    assert build_compressor("signsgd").wire_nbytes(n) == fp32 // 32
    # 2 bits + 32/2048 bits of scale per value: 32/2.015625 = 15.88x (16x is the scale-free bound)
    two = build_compressor("ternary_grad", block_size=2048).wire_nbytes(n)
    assert fp32 / two >= 15.8
    three = build_compressor("ternary_grad", block_size=2048, format="base3").wire_nbytes(n)
    assert fp32 / three >= 19  # 1.6 + 1/64 bits: 19.8x
    assert fp32 / build_compressor("qsgd", block_size=2048, bits=4).wire_nbytes(n) >= 7.9


# ----------------------------------------------------------------------------- error feedback
@pytest.mark.parametrize("vid", ALL)
def test_error_feedback_telescopes(vid):
    """v_t = g_t + e_t, d_t = C(v_t), e_{t+1} = v_t − d_t  ⇒  Σ d_t + e_T = Σ g_t + e_0."""
    comp = make(vid, block_size=32)
    g = torch.Generator().manual_seed(6)
    n = 100
    e0 = 0.1 * torch.randn(n, generator=g)
    e, sent, total = e0.clone(), torch.zeros(n), torch.zeros(n)
    for t in range(10):
        grad = torch.randn(n, generator=g)
        v = grad + e
        buf, d = comp.encode_decode(v, seed=mix_seed(1, t))
        assert torch.equal(d, comp.decode(buf, n))
        e = v - d
        sent += d
        total += grad
    torch.testing.assert_close(sent + e, total + e0, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("vid", ALL)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_propagates(vid, bad):
    comp = make(vid, block_size=8)
    x = torch.randn(20, generator=torch.Generator().manual_seed(7))
    x[3] = bad
    x[17] = bad
    out = comp.decode(comp.encode(x, seed=1), 20)
    if vid == "signsgd":  # no scale to carry it: documented, ±1 out, never a crash
        assert torch.all(out.abs() == 1)
        return
    assert not torch.isfinite(out[:8]).any()  # block 0: scale non-finite
    assert torch.isfinite(out[8:16]).all()  # block 1 untouched
    assert not torch.isfinite(out[16:]).any()  # partial block 2
    _, dec = comp.encode_decode(x, seed=1)
    assert torch.equal(torch.isfinite(dec), torch.isfinite(out))


def test_non_finite_with_clipping():
    comp = build_compressor("ternary_grad", block_size=8, clip_sigma=2.5)
    x = torch.randn(16)
    x[2] = math.nan
    out = comp.decode(comp.encode(x, 0), 16)
    assert not torch.isfinite(out[:8]).any() and torch.isfinite(out[8:]).all()


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("bits", [0, 1, 9, 2.5])
def test_qsgd_bits_validated(bits):
    with pytest.raises(ValueError, match="scheme.bits"):
        build_compressor("qsgd", bits=bits)


def test_options_validated():
    with pytest.raises(ValueError, match="scheme.format"):
        build_compressor("ternary_grad", format="3bit")
    with pytest.raises(ValueError, match="scheme.clip_sigma"):
        build_compressor("ternary_grad", clip_sigma=-1.0)
    with pytest.raises(ValueError, match="scheme.block_size"):
        build_compressor("onebit", block_size=-1)
    with pytest.raises(ValueError, match="scheme.bits"):
        build_compressor("onebit", bits=4)
    with pytest.raises(KeyError, match="scheme.name"):
        build_compressor("nope")


def test_defaults():
    assert build_compressor("onebit").block_size == 256
    assert build_compressor("onebit").scale_dtype == torch.bfloat16
    assert build_compressor("onebit").wire_nbytes(1 << 20) * 30 <= 4 << 20  # >= 30x vs fp32
    assert build_compressor("ef_signsgd").block_size == 0
    assert build_compressor("ternary_grad").block_size == 2048
    assert build_compressor("qsgd").block_size == 2048
    assert [build_compressor(n).biased for n in ("onebit", "ef_signsgd", "signsgd")] == [True] * 3
    assert [build_compressor(n).biased for n in ("ternary_grad", "qsgd")] == [False] * 2


# ----------------------------------------------------------------------------- mix_seed
def test_mix_seed():
    # SplitMix64's first output from state 0 (Vigna's splitmix64.c), shifted to 63 bits
    assert mix_seed(0) == 0xE220A8397B1DCDAF >> 1
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    seeds = {mix_seed(s, step, r, b, p) for s in range(2) for step in range(10)
             for r in range(4) for b in range(3) for p in range(2)}
    assert len(seeds) == 2 * 10 * 4 * 3 * 2
    assert all(0 <= s < 2**63 for s in seeds)
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert mix_seed(0) != mix_seed(0, 0)
    assert 0 <= mix_seed(-1, 2**70) < 2**63
    torch.Generator().manual_seed(mix_seed(5, 6))  # a valid torch seed
    with pytest.raises(ValueError):
        mix_seed()


# ----------------------------------------------------------------------------- traceable
@pytest.mark.parametrize("vid", ["ternary_grad", "qsgd/4"])
def test_traces_without_graph_breaks(vid):
    """The math is plain tensor ops: dynamo captures encode_decode (with precomputed uniforms)
    and decode as single graphs (backend "eager": tracing only, no code generation)."""
    comp = make(vid, block_size=7, clip_sigma=2.5) if vid == "ternary_grad" else make(vid, block_size=7)
    x, u = torch.randn(100), torch.rand(100)
    enc = torch.compile(lambda x, u: comp.encode_decode(x, 0, rand=u), backend="eager", fullgraph=True)
    dec = torch.compile(lambda b: comp.decode(b, 100), backend="eager", fullgraph=True)
    buf, d = enc(x, u)
    ref_buf, ref_d = comp.encode_decode(x, 0, rand=u)
    assert torch.equal(buf, ref_buf) and torch.equal(d, ref_d)
    assert torch.equal(dec(ref_buf), ref_d)

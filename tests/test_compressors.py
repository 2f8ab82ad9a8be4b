"""dqt.comm.compressors over the block formats of dqt.kernels.blockq, parametrized over the
registry (a newly registered compressor with no case in tests/cases.py fails here until it is
given one):

* golden message bytes: worked out by hand for the deterministic schemes; for the stochastic
  ones re-derived by an independent pure-Python Philox and numpy fp32 arithmetic — and every
  kernel implementation (reference, C, Triton) must produce exactly those bytes;
* exact sizes, sign-scheme decodes, the seed contract, unbiasedness (a statistical test with a
  stated tolerance), error-feedback telescoping, compression ratios, non-finite blocks, option
  validation.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from dqt.comm.compressors import COMPRESSORS, build_compressor, mix_seed
from dqt.kernels.blockq import available_impls
from tests.cases import CODECS, STOCHASTIC

IMPLS = available_impls("cpu")  # c (if a compiler is here), triton (interpreter), reference


def _variant_params() -> list[Any]:
    return [pytest.param(vid, id=vid) for vid in CODECS]


ALL = _variant_params()


def make(vid: str, **extra: Any):
    name, options = CODECS[vid]
    return build_compressor(name, **{**options, **extra})


def test_every_registered_compressor_has_settings():
    """A codec registered without a case in tests/cases.py fails here."""
    assert set(COMPRESSORS) == {name for name, _ in CODECS.values()}


# ----------------------------------------------------------------------------- golden bytes
# 20 values in blocks of 8: [0:8] [8:16] [16:20] (the last partial)
X = [3.0, -4.0, 0.0, -0.0, 2.0, -1.0, -2.0, 4.0,
     1.0, 1.0, -1.0, -1.0, 0.5, -0.5, 3.0, -3.0,
     -1.5, 2.0, 0.0, 1.0]
KEY = 0x1234_5678_9ABC_DEF
# mean|x| per block: 16/8 = 2, 11/8 = 1.375, 4.5/4 = 1.125; bits x >= 0 (-0.0 >= 0):
# 1,0,1,1,1,0,0,1 = 0x9D | 1,1,0,0,1,0,1,0 = 0x53 | 0,1,1,1 = 0x0E
# onebit's e8m0 scales: 2 = 2^1 -> 128 = 0x80; 1.375 and 1.125 are below √2·2^0 -> 2^0 = 0x7F
SIGN_BITS = [0x9D, 0x53, 0x0E]
SIGN = [1, -1, 1, 1, 1, -1, -1, 1, 1, 1, -1, -1, 1, -1, 1, -1, -1, 1, 1, 1]
GOLDEN_SIGN: dict[str, tuple[list[int], list[float]]] = {
    "onebit": ([0x80, 0x7F, 0x7F] + SIGN_BITS,
               [s * a for s, a in zip(SIGN, [2.0] * 8 + [1.0] * 12)]),
    "onebit/bf16": ([0x00, 0x40, 0xB0, 0x3F, 0x90, 0x3F] + SIGN_BITS,  # bf16 0x4000 0x3FB0 0x3F90
                    [s * a for s, a in zip(SIGN, [2.0] * 8 + [1.375] * 8 + [1.125] * 4)]),
    # two means per block, (m₀, m₁) = mean|x| of x < 0 and of x >= 0: (7/3, 9/5), (1.375,
    # 1.375), (1.5, 1); e8m0: 2.33 -> 2, 1.8 -> 2 (1.8 >= √2), 1.375 -> 1, 1.5 -> 2, 1 -> 1
    "onebit/two_means": ([0x80, 0x80, 0x7F, 0x7F, 0x80, 0x7F] + SIGN_BITS,
                         [s * 2.0 for s in SIGN[:8]] + [float(s) for s in SIGN[8:16]]
                         + [-2.0, 1.0, 1.0, 1.0]),
    "ef_signsgd": ([0, 0, 0, 0x40, 0, 0, 0xB0, 0x3F, 0, 0, 0x90, 0x3F] + SIGN_BITS,
                   [s * a for s, a in zip(SIGN, [2.0] * 8 + [1.375] * 8 + [1.125] * 4)]),
    "signsgd": (SIGN_BITS, [float(s) for s in SIGN]),
}


def _philox_py(ctr: list[int], key: int) -> list[int]:
    """Philox4x32-10 on Python ints (Salmon et al. 2011), independent of dqt.kernels.philox."""
    k0, k1, (c0, c1, c2, c3) = key & 0xFFFFFFFF, key >> 32, ctr
    for _ in range(10):
        pb, pa = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = (pb >> 32) ^ c1 ^ k0, pb & 0xFFFFFFFF, (pa >> 32) ^ c3 ^ k1, pa & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return [c0, c1, c2, c3]


def _uniform(key: int, block: int, j: int) -> np.float32:
    """Value j: the 16-bit half (j % 8) // 4 of output j % 4 of counter j // 8, as the cell
    midpoint (2·r₁₆ + 1)·2⁻¹⁷."""
    r16 = (_philox_py([j // 8, block, 0, 0], key)[j % 4] >> (16 * ((j % 8) // 4))) & 0xFFFF
    return np.float32(2 * r16 + 1) * np.float32(2.0 ** -17)


def _pack(codes: list[int], bits: int) -> list[int]:
    if bits == 0:  # base-3, five trits per byte
        padded = codes + [0] * (-len(codes) % 5)
        return [sum(padded[5 * b + m] * 3 ** m for m in range(5)) for b in range(len(padded) // 5)]
    stream = sum(c << (bits * i) for i, c in enumerate(codes))
    return [(stream >> (8 * b)) & 0xFF for b in range(-(-len(codes) * bits // 8))]


def _golden_stochastic(vid: str) -> tuple[list[int], list[float]]:
    """The message of X under KEY, re-derived block by block from the formulas."""
    comp = make(vid, block_size=8)
    blocks = [X[0:8], X[8:16], X[16:20]]
    f32 = np.float32
    scales, codes_bytes, decoded = [], [], []
    for k, blk in enumerate(blocks):
        x = np.array(blk, dtype=f32)
        u = np.array([_uniform(KEY, k, j) for j in range(len(blk))], dtype=f32)
        if vid.startswith("ternary"):
            s = f32(np.abs(x).max())
            keep = (u * s) < np.abs(x)
            codes = [int(2 if xi > 0 else 0) if kp else 1 for xi, kp in zip(x, keep)]
            dec = [float(s) if c == 2 else (-float(s) if c == 0 else 0.0) for c in codes]
            bits = 2 if vid == "ternary_grad" else 0
        else:
            L = comp.spec.levels
            s = f32(math.sqrt(sum(float(v) ** 2 for v in x)))
            ell = (np.abs(x) * (f32(1) / s)) * f32(L)  # one reciprocal per block
            lo = np.floor(ell)
            level = np.minimum(lo + (u < ell - lo).astype(f32), f32(L))
            codes = [int(2 * lv + (xi < 0)) for lv, xi in zip(level, x)]
            mag = level * (s / f32(L))  # level times the block's step ν/L
            dec = [float(-m if xi < 0 else m) for m, xi in zip(mag, x)]
            bits = comp.spec.code_bits
        scales += list(np.array([s], dtype=f32).view(np.uint8))
        codes_bytes += _pack(codes, bits)
        decoded += dec
    return [int(b) for b in scales] + codes_bytes, decoded


def _fp8_values(mbits: int, bias: int, fmax: float) -> list[float]:
    """The non-negative finite fp8 values by code 0..127 from the bit layout (None above fmax:
    e4m3fn's NaN, e5m2's inf/NaN)."""
    vals = []
    for c in range(128):
        e, m = c >> mbits, c & ((1 << mbits) - 1)
        v = m * 2.0 ** (1 - bias - mbits) if e == 0 else (1 + m / 2 ** mbits) * 2.0 ** (e - bias)
        vals.append(v if v <= fmax else None)
    return vals


def _golden_fp8(vid: str) -> tuple[list[int], list[float]]:
    """X in blocks of 8 from the format's definition: s = the smallest power of two with
    max|x| <= FMAX·s (so the same in every scale format), code = the nearest fp8 value to x/s,
    ties to the even code, sign bit from x; decode fp8·s in fp32."""
    comp = make(vid, block_size=8)
    e4m3 = comp.spec.kind == "fp8_e4m3"
    fmax = 448.0 if e4m3 else 57344.0
    vals = _fp8_values(3, 7, fmax) if e4m3 else _fp8_values(2, 15, fmax)
    f32 = np.float32
    scales, codes, decoded = [], [], []
    for k in range(0, len(X), 8):
        blk = [f32(x) for x in X[k:k + 8]]
        p = -126
        while float(max(abs(x) for x in blk)) > fmax * 2.0 ** p:
            p += 1
        s = f32(2.0 ** p)
        if comp.spec.scale == "e8m0":
            scales.append(p + 127)
        else:
            scales += list(np.array([s], dtype=f32).view(np.uint8))
        for x in blk:
            q = abs(float(x / s))
            best = min((c for c in range(128) if vals[c] is not None),
                       key=lambda c: (abs(vals[c] - q), c & 1))
            sign = 0x80 if math.copysign(1.0, float(x)) < 0 else 0
            codes.append(best | sign)
            decoded.append(float(f32(-vals[best] if sign else vals[best]) * s))
    return [int(b) for b in scales] + codes, decoded


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vid", ALL)
def test_golden_message(vid, impl):
    comp = make(vid, block_size=8)
    expected, decoded = (_golden_stochastic(vid) if vid in STOCHASTIC else
                         _golden_fp8(vid) if vid.startswith("fp8") else GOLDEN_SIGN[vid])
    x = torch.tensor(X)
    buf, dec = comp.encode_decode(x, seed=KEY, impl=impl)
    assert buf.dtype == torch.uint8 and buf.tolist() == expected
    assert comp.wire_nbytes(len(X)) == len(expected)
    assert dec.tolist() == decoded
    assert torch.equal(comp.decode(buf, len(X), impl=impl), dec)


def test_golden_uniforms_are_not_degenerate():
    """The stochastic golden messages exercise both outcomes of the rounding."""
    u = [float(_uniform(KEY, k, j)) for k in range(3) for j in range(8)]
    assert 0.0 <= min(u) < 0.25 and 0.75 < max(u) < 1.0
    tern = make("ternary_grad", block_size=8)
    dec = tern.encode_decode(torch.tensor(X), seed=KEY)[1]
    x = torch.tensor(X)
    assert bool(((dec == 0) & (x != 0)).any()) and bool(((dec != 0) & (x.abs() < 4)).any())


# ----------------------------------------------------------------------------- sizes, exactness
SIZES = [0, 1, 2, 3, 5, 7, 8, 9, 31, 63, 64, 65, 100, 127, 128, 129, 1000, 2049]


@pytest.mark.parametrize("vid", ALL)
@pytest.mark.parametrize("block_size", [None, 8, 64])
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
        assert torch.equal(out, dec)
        # decoding from a misaligned slice of a bigger receive buffer
        shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), buf])[1:]
        assert torch.equal(comp.decode(shifted, n), dec)


def test_wire_nbytes_formulas():
    n = 1000  # 15 blocks of 64 + one of 40
    assert build_compressor("onebit", block_size=64).wire_nbytes(n) == 16 + 15 * 8 + 5
    assert build_compressor("onebit", block_size=64, scale_dtype="bf16").wire_nbytes(n) == 2 * 16 + 125
    assert build_compressor("onebit", block_size=64, scale_dtype="fp32").wire_nbytes(n) == 4 * 16 + 125
    # two_means: two scales per block
    assert build_compressor("onebit", block_size=64, reconstruction="two_means").wire_nbytes(n) \
        == 2 * 16 + 125
    assert build_compressor("ef_signsgd").wire_nbytes(n) == 4 + 125
    assert build_compressor("signsgd").wire_nbytes(n) == 125
    assert build_compressor("ternary_grad", block_size=64).wire_nbytes(n) == 64 + 250
    # base-3 packs each block on its own: 15·ceil(64/5) + ceil(40/5)
    assert build_compressor("ternary_grad", block_size=64, format="base3").wire_nbytes(n) == \
        64 + 15 * 13 + 8
    for k in range(2, 9):
        assert build_compressor("qsgd", block_size=64, bits=k).wire_nbytes(n) == \
            64 + 15 * 8 * k + -(-40 * k // 8)
    for vid in [v.values[0] for v in ALL]:
        assert make(vid).wire_nbytes(0) == 0


def _as_sent(comp, scale: torch.Tensor) -> torch.Tensor:
    """An fp32 statistic as the codec's scale format sends it."""
    if comp.spec.scale == "bf16":
        return scale.to(torch.bfloat16).float()  # round to nearest even
    if comp.spec.scale == "e8m0" and float(scale) > 0:  # the nearest power of two in log2
        return torch.tensor(2.0 ** math.floor(math.log2(float(scale)) + 0.5))
    return scale


@pytest.mark.parametrize("vid", ["onebit", "onebit/two_means", "ef_signsgd", "signsgd"])
@pytest.mark.parametrize("block_size", [None, 64, 104])
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
    bs = comp.block_size
    expected = torch.empty(n)
    for start in range(0, n, bs):  # the formula, one block at a time
        blk = x[start:start + bs]
        if comp.cfg.reconstruction == "two_means":  # Seide et al.: the mean of each sign group
            neg, pos = blk[blk < 0], blk[blk >= 0]
            a0 = _as_sent(comp, (neg.abs().sum(dtype=torch.float64) / neg.numel()).float())
            a1 = _as_sent(comp, (pos.sum(dtype=torch.float64) / pos.numel()).float())
            expected[start:start + bs] = torch.where(blk >= 0, a1, -a0)
            continue
        scale = (blk.abs().sum(dtype=torch.float64) / blk.numel()).float()  # fp64 accumulation
        expected[start:start + bs] = _as_sent(comp, scale) * sign[start:start + bs]
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- randomness
@pytest.mark.parametrize("vid", ALL)
def test_reproducible_from_seed(vid):
    comp = make(vid, block_size=64)
    x = torch.randn(256, generator=torch.Generator().manual_seed(2))
    a, b = comp.encode(x, seed=11), comp.encode(x, seed=11)
    assert torch.equal(a, b)
    if vid not in STOCHASTIC:  # deterministic: the seed plays no part
        assert comp.biased
        assert torch.equal(comp.encode(x, seed=12), a)
    else:
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
        sigma = torch.linalg.vector_norm(blocks, dim=1, keepdim=True) / (2 * comp.spec.levels)
    tol = (5 * sigma / math.sqrt(trials)).expand(-1, bs).reshape(-1).double()
    err = (mean - x.double()).abs()
    assert torch.all(err <= tol + 1e-7), f"max err/tol {float((err / tol).max()):.2f}"
    assert mean[5] == 0.0


def test_ternary_base3_decodes_like_2bit():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(4))
    two, three = make("ternary_grad", block_size=96), make("ternary_grad/base3", block_size=96)
    for seed in range(5):
        b2, b3 = two.encode(x, seed), three.encode(x, seed)
        assert b3.numel() < b2.numel()
        assert torch.equal(two.decode(b2, 1001), three.decode(b3, 1001))
        assert torch.equal(b2[:4 * 11], b3[:4 * 11])  # the same scales


def test_ternary_clipping():
    x = torch.tensor([1.0, -1.0] * 31 + [0.5, 100.0])
    comp = build_compressor("ternary_grad", block_size=64, clip_sigma=2.5)
    assert comp.biased is True
    sigma = float(x.double().std(unbiased=False))
    s = comp.encode(x, 0)[:4].view(torch.float32)
    assert math.isclose(float(s), 2.5 * sigma, rel_tol=1e-6)
    out = comp.decode(comp.encode(x, 0), x.numel())
    assert float(out.abs().max()) <= 2.5 * sigma * (1 + 1e-6)
    # clip_sigma = 0 is plain TernGrad: s = max|x|
    plain = build_compressor("ternary_grad", block_size=64)
    assert float(plain.encode(x, 0)[:4].view(torch.float32)) == 100.0


# ----------------------------------------------------------------------------- ratios
def test_compression_ratio():
    n, fp32 = 2**20, 4 * 2**20
    assert fp32 / build_compressor("onebit").wire_nbytes(n) >= 30  # 1 + 8/128 bits
    two = build_compressor("onebit", reconstruction="two_means").wire_nbytes(n)
    assert fp32 / two >= 28.4  # 1 + 16/128 bits: 28.44x
    assert build_compressor("signsgd").wire_nbytes(n) == fp32 // 32
    # 2 bits + 32/2048 bits of scale per value: 32/2.015625 = 15.88x (16x is the scale-free bound)
    two = build_compressor("ternary_grad").wire_nbytes(n)
    assert fp32 / two >= 15.8
    three = build_compressor("ternary_grad", format="base3").wire_nbytes(n)
    assert fp32 / three >= 19.7  # 8/5 bits (410 bytes per 2048) + 1/64 bits: 19.8x
    # 4 bits + 32/128 bits of scale per value: 32/4.25 = 7.53x
    assert fp32 / build_compressor("qsgd", bits=4).wire_nbytes(n) >= 7.5
    assert fp32 / build_compressor("qsgd", bits=4, block_size=2048).wire_nbytes(n) >= 7.9
    # fp8: 1 byte per value + a 1-byte e8m0 scale per 128 (fp32: 4 bytes): exact byte counts
    assert build_compressor("fp8").wire_nbytes(n) == n + n // 128
    assert build_compressor("fp8", format="e5m2", scale_dtype="fp32").wire_nbytes(n) == \
        n + 4 * (n // 128)
    assert build_compressor("fp8", block_size=64).wire_nbytes(1000) == 1000 + 16


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
    # exact in real arithmetic; fp32 rounds each of the ~40 additions (values up to ~10 for
    # qsgd/2, whose decode is ±‖v‖ of a 32-value block): |error| <= 40·10·2^-24 ≈ 2.4e-5
    torch.testing.assert_close(sent + e, total + e0, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("vid", ALL)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_block_decodes_to_nan(vid, bad):
    comp = make(vid, block_size=8)
    x = torch.randn(20, generator=torch.Generator().manual_seed(7))
    x[3] = bad
    x[17] = bad
    buf = comp.encode(x, seed=1)
    out = comp.decode(buf, 20)
    assert torch.isfinite(out[8:16]).all()  # block 1 untouched
    if vid == "signsgd":  # no scale to carry it: the block's codes are zero (−1); the
        assert torch.equal(out[:8], -torch.ones(8))  # collective adds a flag byte for this
        return
    assert torch.isnan(out[:8]).all() and torch.isnan(out[16:]).all()
    sb = comp.spec.scale_nbytes  # every scale of the block (two_means: two)
    nan_scale = {"e8m0": [0xFF], "bf16": [0xC0, 0x7F], "fp32": [0, 0, 0xC0, 0x7F]}[comp.spec.scale]
    assert buf[:sb].tolist() == nan_scale * comp.spec.scales_per_block  # the format's NaN


def test_non_finite_with_clipping():
    comp = build_compressor("ternary_grad", block_size=8, clip_sigma=2.5)
    x = torch.randn(16)
    x[2] = math.nan
    out = comp.decode(comp.encode(x, 0), 16)
    assert torch.isnan(out[:8]).all() and torch.isfinite(out[8:]).all()


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("bits", [0, 1, 9, 2.5])
def test_qsgd_bits_validated(bits):
    with pytest.raises(ValueError, match="scheme.bits"):
        build_compressor("qsgd", bits=bits)


@pytest.mark.parametrize("block_size", [-8, 0, 4, 100, 2.0])
def test_block_size_validated(block_size):
    with pytest.raises(ValueError, match="scheme.block_size: must be a positive multiple of 8"):
        build_compressor("onebit", block_size=block_size)


def test_options_validated():
    with pytest.raises(ValueError, match="scheme.format"):
        build_compressor("ternary_grad", format="3bit")
    with pytest.raises(ValueError, match="scheme.clip_sigma"):
        build_compressor("ternary_grad", clip_sigma=-1.0)
    with pytest.raises(ValueError, match="scheme.scale_dtype: must be 'fp32', 'bf16' or 'e8m0'"):
        build_compressor("onebit", scale_dtype="fp16")
    with pytest.raises(ValueError, match="scheme.reconstruction: must be one of symmetric, "
                       "two_means; got 'median'"):
        build_compressor("onebit", reconstruction="median")
    with pytest.raises(ValueError, match="scheme.bits: not an option of compressor 'onebit'"):
        build_compressor("onebit", bits=4)
    with pytest.raises(KeyError, match="scheme.name"):
        build_compressor("nope")


def test_defaults():
    assert build_compressor("onebit").block_size == 128
    assert build_compressor("onebit").spec.scale == "e8m0"
    assert build_compressor("onebit").spec.kind == "sign_mean"  # reconstruction=symmetric
    assert build_compressor("onebit", reconstruction="two_means").spec.kind == "sign_two"
    assert build_compressor("ef_signsgd", reconstruction="two_means").spec.kind == "sign_two"
    assert build_compressor("ef_signsgd").block_size == 2048
    assert build_compressor("ef_signsgd").spec.scale == "fp32"
    assert build_compressor("ternary_grad").block_size == 2048
    assert build_compressor("qsgd").block_size == 128
    assert [build_compressor(n).biased for n in ("onebit", "ef_signsgd", "signsgd")] == [True] * 3
    assert [build_compressor(n).biased for n in ("ternary_grad", "qsgd")] == [False] * 2
    assert [n for n in COMPRESSORS if build_compressor(n).vote] == ["signsgd"]
    fp8 = build_compressor("fp8")
    assert (fp8.block_size, fp8.spec.kind, fp8.spec.scale, fp8.cfg.error_feedback) == \
        (128, "fp8_e4m3", "e8m0", False)
    assert build_compressor("fp8", format="e5m2").spec.kind == "fp8_e5m2"
    with pytest.raises(ValueError, match="scheme.format"):
        build_compressor("fp8", format="e3m4")


def test_e8m0_scale_rounds_to_the_nearest_power_of_two_in_log2():
    """Byte e = 2^(e−127); m·2^E rounds up iff m >= √2; 0 stays 0, subnormals flush to 0,
    the largest finite values cap at 2^127 (254); 255 is NaN."""
    from dqt.kernels.blockq import _e8m0_code, _e8m0_value

    root2 = torch.tensor(math.sqrt(2), dtype=torch.float32)  # fp32(√2) = 1.4142135381... < √2
    above = torch.nextafter(root2, torch.tensor(2.0))  # the first fp32 above √2
    cases = {1.0: 127, 1.9999: 128, 2.0: 128, 0.75: 127, 0.7: 126, 0.0: 0, 1e-40: 0,
             float(root2): 127, float(above): 128, 3.0e38: 254, 2.0 ** -126: 1}
    for value, code in cases.items():
        got = int(_e8m0_code(torch.tensor([value], dtype=torch.float32)))
        assert got == code, (value, got, code)
    assert int(_e8m0_code(torch.tensor([float("inf")]))) == 255
    assert _e8m0_value(torch.tensor([0, 1, 127, 254])).tolist() == [0.0, 2.0**-126, 1.0, 2.0**127]
    assert math.isnan(float(_e8m0_value(torch.tensor([255]))))


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
    with pytest.raises(ValueError):
        mix_seed()

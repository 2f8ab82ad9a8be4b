"""The fp8 block kinds (``fp8_e4m3``, ``fp8_e5m2``) of dqt.kernels.blockq: on every
implementation (C, Triton through the interpreter, the reference) the codes are exactly
torch's round-to-nearest-even cast of clamp(v / s, ±FMAX) with s the smallest power of two
2^P (P ≥ −126) with max|v| ≤ FMAX·2^P, the same in every scale format; decoding is exact (every
one of the 256 codes); zeros, fp32 subnormals, fp8 subnormals, ties, maxima just above
FMAX·2^P and NaN blocks give the same bytes everywhere. The byte-identity tests over arbitrary tables are those of
tests/test_kernels_blockq.py, on the fp8 entries of tests/cases.py's SPECS.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from dqt.kernels import blockq
from dqt.kernels.blockq import BlockSpec, available_impls, linear_table

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
IMPLS = available_impls("cpu")
FORMATS = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}
SCALE_BYTES = {"fp32": 4, "bf16": 2, "e8m0": 1}
B = 64


def _edge_values(fmax: float) -> torch.Tensor:
    """Blocks of 64: [0] scale exactly 1 (max fmax) with e4m3 and e5m2 ties, fp8 subnormals
    and their midpoints, -0.0; [1] all zeros; [2] fp32 subnormals; [3] a NaN; [4] +inf;
    [5] maxima 1.40·FMAX and just above 2·FMAX (scale 4, not 2: nothing saturates); [6] random
    values over 12 decades; [7] a short block of 5."""
    g = torch.Generator().manual_seed(3)
    b0 = torch.zeros(B)
    b0[:16] = torch.tensor([448.0, 1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -7,
                            -1.0625, -0.0, 0.0, 2.0 ** -6 - 2.0 ** -10, 240.0, 232.0, 1e-30,
                            -448.0, 5 * 2.0 ** -10, 2.0 ** -9])
    b0[16:20] = torch.tensor([1.125, 1.375, 3 * 2.0 ** -17, 2.0 ** -17])  # e5m2 ties
    b0[20:] = torch.randn(B - 20, generator=g)
    b0[20] = fmax
    b2 = torch.randn(B, generator=g) * 1e-39  # fp32 subnormals
    b3 = torch.randn(B, generator=g)
    b3[9] = math.nan
    b4 = torch.randn(B, generator=g)
    b4[0] = math.inf
    b5 = torch.randn(B, generator=g)
    b5[3] = 1.40 * fmax
    b5[4] = -torch.nextafter(torch.tensor(2 * fmax), torch.tensor(math.inf))  # max: s = 4
    b6 = torch.randn(B, generator=g) * torch.logspace(-8, 4, B)[torch.randperm(B, generator=g)]
    b7 = torch.tensor([0.5, -0.25, 3.0, -7.0, 1e-3])
    return torch.cat([b0, torch.zeros(B), b2, b3, b4, b5, b6, b7])


def _encode(spec: BlockSpec, x: torch.Tensor, impl: str):
    table, nbytes = linear_table(spec, x.numel())
    msg = torch.zeros(nbytes, dtype=torch.uint8)
    bad = torch.zeros(table.shape[0], dtype=torch.int32)
    blockq.encode(spec, x, table, msg, bad=bad, impl=impl)
    out = torch.empty_like(x)
    blockq.decode(spec, msg, table, out, impl=impl)
    return table, msg, bad, out


def _scales(spec: BlockSpec, msg: torch.Tensor, k: int) -> torch.Tensor:
    """The k transmitted scales as fp32 (the scale field sits at the message's start)."""
    nb = SCALE_BYTES[spec.scale]
    b = msg[:k * nb].view(k, nb).to(torch.int64)
    bits = sum(b[:, t] << (8 * t) for t in range(nb))
    if spec.scale == "e8m0":
        v = torch.where(bits == 0, 0.0, (bits << 23).to(torch.int32).view(torch.float32))
        return torch.where(bits == 255, math.nan, v)
    if spec.scale == "bf16":
        bits = bits << 16
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("scale", ["fp32", "bf16", "e8m0"])
@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("impl", IMPLS)
def test_codes_are_torchs_cast_at_a_power_of_two_scale(impl, kind, scale):
    dtype, fmax = FORMATS[kind]
    spec = BlockSpec(kind, B, 8, scale)
    x = _edge_values(fmax)
    table, msg, bad, out = _encode(spec, x, impl)
    K = table.shape[0]
    assert bad.tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    s = _scales(spec, msg, K)
    # the scale: the smallest 2^P, P >= -126, with max|v| <= FMAX·2^P, exact rational maths
    for k, (d, _, n, *_r) in enumerate(table.tolist()):
        if bad[k]:
            continue
        amax = Fraction(float(x[d:d + n].abs().max()))
        p = -126
        while amax > Fraction(fmax) * Fraction(2) ** p:
            p += 1
        assert float(s[k]) == (0.0 if amax == 0 else 2.0 ** p), (k, float(s[k]))
    assert s[0] == 1.0 and s[1] == 0.0 and s[2] == 2.0 ** -126 and s[5] == 4.0
    assert torch.isnan(s[bad == 1]).all()
    codes = msg[K * SCALE_BYTES[scale]:]
    want, dec = [], []
    for k, (d, _, n, *_r) in enumerate(table.tolist()):
        v = x[d:d + n]
        if bad[k]:
            c = torch.zeros(n, dtype=torch.uint8)
            dv = torch.full((n,), math.nan)
        else:
            q = (v / s[k]).clamp(-fmax, fmax) if s[k] > 0 else torch.zeros(n)
            c = q.to(dtype).view(torch.uint8)
            dv = c.view(dtype).to(torch.float32) * s[k]
        want.append(c)
        dec.append(dv)
    want, dec = torch.cat(want), torch.cat(dec)
    assert torch.equal(codes, want), (codes != want).nonzero().flatten()[:8].tolist()
    nan = torch.isnan(dec)
    assert torch.equal(torch.isnan(out), nan) and torch.equal(out[~nan], dec[~nan])
    # the edge cases did occur: ties rounded to even, -0.0, subnormal codes, no saturation
    if kind == "fp8_e4m3" and scale == "fp32":
        assert codes[:10].tolist() == [0x7E, 0x38, 0x3A, 0x00, 0x02, 0x04, 0xB8, 0x80, 0x00,
                                       0x08]
    if kind == "fp8_e5m2" and scale == "fp32":
        assert codes[16:20].tolist() == [0x3C, 0x3E, 0x02, 0x00] and codes[20] == 0x7B
    if kind == "fp8_e4m3":  # 1.40·448/4 = 156.8 → 160; -(2·448)⁺/4 → -224
        assert codes[5 * B + 3] == 0x72 and codes[5 * B + 4] == 0xF6


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("impl", IMPLS)
def test_every_code_decodes_exactly(impl, kind):
    """All 256 bytes (NaN and e5m2's inf included) decode to torch's value times the scale."""
    dtype, _ = FORMATS[kind]
    spec = BlockSpec(kind, 256, 8, "fp32")
    table, nbytes = linear_table(spec, 256)
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    for scale in (1.0, 0.375, 2.0 ** -20):
        msg = torch.cat([torch.tensor([scale]).view(torch.uint8), codes])
        out = torch.empty(256)
        blockq.decode(spec, msg, table, out, impl=impl)
        want = codes.view(dtype).to(torch.float32) * torch.tensor(scale)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(out), nan) and torch.equal(out[~nan], want[~nan])
        assert nan.sum() == (2 if kind == "fp8_e4m3" else 6)


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_edge_values_match_the_reference_with_error_feedback(impl, kind):
    spec = BlockSpec(kind, B, 8, "bf16")
    x = _edge_values(FORMATS[kind][1])
    table, nbytes = linear_table(spec, x.numel())
    res = {}
    for which in ("reference", impl):
        r = torch.randn(x.numel(), generator=torch.Generator().manual_seed(5)) * 0.01
        msg = torch.zeros(nbytes, dtype=torch.uint8)
        blockq.encode(spec, x, table, msg, r, 1024.0, 0, impl=which)
        res[which] = (msg, r)
    assert torch.equal(res[impl][0], res["reference"][0])
    a, b = res[impl][1], res["reference"][1]
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


def test_spec_needs_8_bit_codes():
    with pytest.raises(ValueError, match="code_bits = 8"):
        BlockSpec("fp8_e4m3", 64, 4, "fp32")

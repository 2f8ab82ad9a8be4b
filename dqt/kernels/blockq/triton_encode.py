"""The Triton encode kernel of :mod:`dqt.kernels.blockq`, one program per block: load the
block (+ S·residual), reduce its statistic (fp64 sums), round the scale, quantize with Philox
uniforms (``tl.philox``, the counters of :mod:`dqt.kernels.philox`; one call per 8 values, the
16-bit halves of its 4 outputs joined into the tile), pack the codes into bytes (base-3: the
tile's codes gathered 5 to a byte) and store them, the scale bytes and the new residual — one
pass over the data.
Launched by :func:`dqt.kernels.blockq.triton_impl.encode`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dqt.kernels.blockq.triton_common import (BF16_NAN, CODE, COLUMNS, CTR, DATA, E8M0_MAX,
                                              E8M0_NAN, E8M0_ROUND_UP, FP32_NAN, KIND_QSGD,
                                              KIND_SIGN, KIND_SIGN_MEAN, KIND_SIGN_TWO,
                                              KIND_TERNARY, LEN, MSG, RES, SCALE, SCALE_BF16,
                                              SCALE_E8M0, SCALE_FP32, e8m0_value)
from dqt.kernels.blockq.triton_common import KIND_FP8_E4M3, KIND_FP8_E5M2, fp8_value


@triton.jit
def _philox_u(key, ctr, q):
    """The four 32-bit outputs of counters (q, ctr): values 8q + t and 8q + 4 + t take the low
    and the high half of output t (t = 0..3)."""
    q = q.to(tl.uint32)
    c1 = q * 0 + ctr.to(tl.uint32)
    z = q * 0
    r0, r1, r2, r3 = tl.philox(key, q, c1, z, z)
    return r0, r1, r2, r3


@triton.jit
def _to_uniform(r16):
    """A 16-bit random number → (2·r16 + 1)·2⁻¹⁷, exact in fp32."""
    return (2 * r16 + 1).to(tl.float32) * 7.62939453125e-06


@triton.jit
def _load_v(x_ptr, res_ptr, data, roff, e, m, S, HAS_RES: tl.constexpr, UNIT: tl.constexpr):
    """The values to code at indices e: x (+ S·residual with error feedback)."""
    v = tl.load(x_ptr + data + e, mask=m, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + roff + e, mask=m, other=0.0)
        if UNIT:
            v = v + res
        else:
            v = v + res * S
    return v


@triton.jit
def _pow3(mm):
    return tl.where(mm == 0, 1, tl.where(mm == 1, 3, tl.where(mm == 2, 9,
                    tl.where(mm == 3, 27, tl.where(mm == 4, 81, 1)))))  # 1: unused lanes


@triton.jit
def _bf16_bits(x):
    b = x.to(tl.uint32, bitcast=True)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(x != x, BF16_NAN, r)


@triton.jit
def _e8m0_code(x):
    b = x.to(tl.uint32, bitcast=True)
    e = (b >> 23) & 0xFF
    r = tl.minimum(e + ((b & 0x7FFFFF) >= E8M0_ROUND_UP).to(tl.uint32), E8M0_MAX)
    r = tl.where(e == 0, 0, r)
    return tl.where(tl.abs(x) < float("inf"), r, E8M0_NAN)  # NaN compares false: E8M0_NAN


@triton.jit
def _sent_scale(raw, SCALE_FMT: tl.constexpr):
    """(the scale's bits on the wire, the scale as sent): raw rounded to the scale format."""
    if SCALE_FMT == SCALE_BF16:
        sbits = _bf16_bits(raw)
        s = (sbits << 16).to(tl.float32, bitcast=True)
    elif SCALE_FMT == SCALE_E8M0:
        sbits = _e8m0_code(raw)
        s = e8m0_value(sbits)
    else:
        sbits = raw.to(tl.uint32, bitcast=True)
        s = raw
    return sbits, s


@triton.jit
def _store_scale(p, sbits, bad, SCALE_FMT: tl.constexpr):
    """One scale's little-endian bytes at p (the format's NaN for a non-finite block)."""
    if SCALE_FMT == SCALE_FP32:
        t4 = tl.arange(0, 4)
        sb = tl.where(bad, FP32_NAN, sbits)
        tl.store(p + t4, ((sb >> (8 * t4)) & 0xFF).to(tl.uint8))
    elif SCALE_FMT == SCALE_BF16:
        t2 = tl.arange(0, 2)
        sb = tl.where(bad, BF16_NAN, sbits)
        tl.store(p + t2, ((sb >> (8 * t2)) & 0xFF).to(tl.uint8))
    elif SCALE_FMT == SCALE_E8M0:
        tl.store(p, tl.where(bad, E8M0_NAN, sbits).to(tl.uint8))


@triton.jit
def _group_mean_abs(v, group):
    """fp32(Σ_group |v| / n_group) (fp64 sum), 0 for an empty group."""
    cnt = tl.sum(group.to(tl.int32))
    total = tl.sum(tl.where(group, tl.abs(v), 0.0).to(tl.float64))
    mean = (total / tl.maximum(cnt, 1).to(tl.float64)).to(tl.float32)
    return tl.where(cnt > 0, mean, 0.0)


@triton.jit
def _fp8_scale(amax, F: tl.constexpr):
    """The smallest power of two 2^P, P ≥ −126, with amax ≤ FMAX·2^P (FMAX = 1.75·2^F);
    amax itself where it is 0 or not finite."""
    b = amax.to(tl.uint32, bitcast=True)
    e = (b >> 23).to(tl.int32)
    p = tl.where(e == 0, -126, e - 127 - F + ((b & 0x7FFFFF) > 0x600000).to(tl.int32))
    s = ((tl.maximum(p, -126) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where((amax > 0) & (amax < float("inf")), s, amax)


@triton.jit
def _fp8_code(v, s, FMAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
              MAGIC: tl.constexpr, SUB_STEP: tl.constexpr):
    """fp8 bytes of clamp(v / s, ±FMAX) (0 where s = 0) by c10's bit operations, round to
    nearest even (MAGIC: the fp32 whose ulp is the fp8 subnormal step), and their decode."""
    pos = s > 0
    # s is a power of two ≥ 2⁻¹²⁶ (or 0): 1/s is exact, so v·(1/s) is v / s bit for bit
    q = tl.where(pos, v * tl.math.div_rn(s * 0 + 1.0, tl.where(pos, s, 1.0)), 0.0)
    q = tl.where(q < -FMAX, -FMAX, tl.where(q > FMAX, FMAX, q))
    b = q.to(tl.uint32, bitcast=True)
    sign = (b >> 24) & 0x80
    a = b & 0x7FFFFFFF
    MAGIC_BITS: tl.constexpr = (151 - MBITS - BIAS) << 23
    sub = (a.to(tl.float32, bitcast=True) + MAGIC).to(tl.uint32, bitcast=True) - MAGIC_BITS
    MINN: tl.constexpr = (128 - BIAS) << 23
    SH: tl.constexpr = 23 - MBITS
    an = tl.maximum(a, MINN)
    nrm = (an - ((127 - BIAS) << 23) + ((1 << (SH - 1)) - 1) + ((an >> SH) & 1)) >> SH
    c = (tl.where(a < MINN, sub, nrm) | sign).to(tl.int32)
    return c, fp8_value(c, MBITS, BIAS, SUB_STEP) * s


@triton.jit
def _code_and_decode(v, w, u, s, s0, r, step, KIND: tl.constexpr, LEVELS: tl.constexpr):
    """codes (int32) and the decoded values of a block's values v (w: clipped v; s0:
    sign_two's m₀, s its m₁)."""
    if KIND == KIND_SIGN_MEAN:
        c = (v >= 0).to(tl.int32)
        d = tl.where(c == 1, s, -s)
    elif KIND == KIND_SIGN_TWO:
        c = (v >= 0).to(tl.int32)
        d = tl.where(c == 1, s, -s0)
    elif KIND == KIND_SIGN:
        c = (v >= 0).to(tl.int32)
        d = tl.where(c == 1, 1.0, -1.0)
    elif KIND == KIND_FP8_E4M3:
        c, d = _fp8_code(v, s, 448.0, 3, 7, 16384.0, 0.001953125)
    elif KIND == KIND_FP8_E5M2:
        c, d = _fp8_code(v, s, 57344.0, 2, 15, 128.0, 1.52587890625e-05)
    elif KIND == KIND_TERNARY:
        keep = (u * s) < tl.abs(w)
        c = tl.where(keep, tl.where(w > 0, 2, 0), 1)
        d = tl.where(c == 2, s, tl.where(c == 0, -s, 0.0))
    else:  # KIND_QSGD
        ell = (tl.abs(v) * r) * LEVELS
        lo = tl.floor(ell)
        level = lo + tl.where(u < ell - lo, 1.0, 0.0)
        level = tl.where(level >= 0, level, 0.0)
        level = tl.minimum(level, LEVELS * 1.0)
        neg = v < 0
        c = 2 * level.to(tl.int32) + neg.to(tl.int32)
        mag = level * step
        d = tl.where(neg, -mag, mag)
    return c, d


@triton.jit
def encode_kernel(x_ptr, tab_ptr, msg_ptr, res_ptr, bad_ptr, S, inv_s, key,
                  KIND: tl.constexpr, STOCHASTIC: tl.constexpr, CODE_BITS: tl.constexpr,
                  SCALE_FMT: tl.constexpr, SCALE_BYTES: tl.constexpr, LEVELS: tl.constexpr,
                  CLIP: tl.constexpr, LANES: tl.constexpr, NB3: tl.constexpr, KB: tl.constexpr,
                  HAS_RES: tl.constexpr, HAS_BAD: tl.constexpr, UNIT: tl.constexpr):
    """One program per block, LANES (a power of two >= the block size) values wide; NB3: code
    bytes of a base-3 block, rounded up to a power of two; KB: CODE_BITS rounded up to one;
    SCALE_BYTES: the bytes of one scale (sign_two's m₁ follows its m₀)."""
    pid = tl.program_id(0).to(tl.int64)
    row = tab_ptr + pid * COLUMNS
    data = tl.load(row + DATA)
    roff = tl.load(row + RES)
    n = tl.load(row + LEN)
    mbase = tl.load(row + MSG)
    soff = mbase + tl.load(row + SCALE)
    coff = mbase + tl.load(row + CODE)
    ctr = tl.load(row + CTR)
    # lanes (g, h, i) hold value e = 8g + 4h + i: a group of 8 values packs into whole
    # bytes, and (g, i, h) is its Philox (counter, output, half) — no shuffles needed
    G: tl.constexpr = LANES // 8
    g = tl.arange(0, G)[:, None, None]
    h = tl.arange(0, 2)[None, :, None]
    i = tl.arange(0, 4)[None, None, :]
    e = 8 * g + 4 * h + i
    m = e < n
    v = _load_v(x_ptr, res_ptr, data, roff, e, m, S, HAS_RES, UNIT)
    finite = tl.min(tl.where(m, (tl.abs(v) < float("inf")).to(tl.int32), 1))
    n64 = n.to(tl.float64)
    w = v
    bound = 0.0
    raw0 = 0.0  # sign_two: m₀ (raw is its m₁)
    if KIND == KIND_SIGN_MEAN:
        raw = (tl.sum(tl.where(m, tl.abs(v), 0.0).to(tl.float64)) / n64).to(tl.float32)
    elif KIND == KIND_SIGN_TWO:
        raw0 = _group_mean_abs(v, m & (v < 0))
        raw = _group_mean_abs(v, m & (v >= 0))
    elif KIND == KIND_SIGN:
        raw = tl.sum(v * 0) + 1.0
    elif KIND == KIND_TERNARY:
        if CLIP > 0:
            mean = (tl.sum(v.to(tl.float64)) / n64).to(tl.float32)
            dv = tl.where(m, v - mean, 0.0).to(tl.float64)
            bound = (CLIP * tl.sqrt(tl.sum(dv * dv) / n64)).to(tl.float32)
            w = tl.minimum(tl.maximum(v, -bound), bound)
        raw = tl.max(tl.where(m, tl.abs(w), 0.0))
    elif KIND == KIND_FP8_E4M3:
        raw = _fp8_scale(tl.max(tl.where(m, tl.abs(v), 0.0)), 8)
    elif KIND == KIND_FP8_E5M2:
        raw = _fp8_scale(tl.max(tl.where(m, tl.abs(v), 0.0)), 15)
    else:  # KIND_QSGD
        v64 = v.to(tl.float64)
        raw = tl.sqrt(tl.sum(v64 * v64)).to(tl.float32)
    sbits, s = _sent_scale(raw, SCALE_FMT)
    s0 = s
    bad = (finite == 0) | (tl.abs(s) >= float("inf")) | (s != s)
    if KIND == KIND_SIGN_TWO:
        sbits0, s0 = _sent_scale(raw0, SCALE_FMT)
        bad = bad | (tl.abs(s0) >= float("inf")) | (s0 != s0)
    r = s * 0.0
    step = s * 0.0
    if KIND == KIND_QSGD:
        pos = s > 0
        r = tl.where(pos, tl.math.div_rn(s * 0 + 1.0, tl.where(pos, s, 1.0)), 0.0)
        r = tl.where(tl.abs(r) < float("inf"), r, 0.0)
        step = tl.math.div_rn(s, s * 0 + LEVELS)
    if KIND == KIND_SIGN_TWO:  # the scale field: m₀, then m₁
        _store_scale(msg_ptr + soff, sbits0, bad, SCALE_FMT)
        _store_scale(msg_ptr + soff + SCALE_BYTES, sbits, bad, SCALE_FMT)
    else:
        _store_scale(msg_ptr + soff, sbits, bad, SCALE_FMT)
    if HAS_BAD:
        tl.store(bad_ptr + pid, bad.to(tl.int32))
    good = e * 0 + (1 - bad.to(tl.int32)) > 0  # the block is finite
    if STOCHASTIC:  # ternary, qsgd
        # one Philox call per counter g, on a (G,) tile (a (G, 2, 1) one would be replicated
        # over the threads of the other axes); its 4 outputs are joined into the last axis:
        # [g, a, b] = output 2a + b, i.e. (G, 1, 4) after a reshape, and lane (g, h, i) takes
        # the half h of output i
        r0, r1, r2, r3 = _philox_u(key, ctr, tl.arange(0, G))
        rr = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (G, 1, 4))
        u = _to_uniform((rr >> (16 * h).to(tl.uint32)) & 0xFFFF)
    else:
        u = v * 0
    c, d = _code_and_decode(v, w, u, s, s0, r, step, KIND, LEVELS)
    c = tl.where(m & good, c, 0)  # padding lanes and non-finite blocks code 0
    if HAS_RES:
        if UNIT:
            enew = v - d
        else:
            enew = (v - d) * inv_s
        tl.store(res_ptr + roff + e, enew, mask=m & good)
    if CODE_BITS > 0:
        tb = tl.arange(0, KB)[None, :]  # KB = next power of two >= k: dense byte tiles
        if CODE_BITS <= 4:  # a group of 8 codes fits a 32-bit word
            word = tl.sum(tl.sum(c.to(tl.uint32) << (CODE_BITS * (4 * h + i)).to(tl.uint32),
                                 axis=2), axis=1)  # (G,): the group's k bytes, little-endian
            by = ((word[:, None] >> (8 * tb).to(tl.uint32)) & 0xFF).to(tl.uint8)
        else:
            word = tl.sum(tl.sum(c.to(tl.uint64) << (CODE_BITS * (4 * h + i)).to(tl.uint64),
                                 axis=2), axis=1)
            by = ((word[:, None] >> (8 * tb).to(tl.uint64)) & 0xFF).to(tl.uint8)
        posb = tl.arange(0, G)[:, None] * CODE_BITS + tb
        nbytes = (n * CODE_BITS + 7) // 8
        tl.store(msg_ptr + coff + posb, by, mask=(tb < CODE_BITS) & (posb < nbytes))
    else:  # base-3: byte b = sum_m 3^m code[5b + m], the codes gathered from the tile
        b = tl.arange(0, NB3)[:, None]
        mm = tl.arange(0, 8)[None, :]
        ev = 5 * b + mm
        ok = (mm < 5) & (ev < n)
        cf = tl.reshape(c, (LANES,))
        idx = tl.reshape(tl.where(ok, ev, 0), (NB3 * 8,))
        c2 = tl.reshape(tl.gather(cf, idx, 0), (NB3, 8))
        c2 = tl.where(ok, c2, 0)
        byte = tl.sum(c2 * _pow3(mm), axis=1)
        bidx = tl.arange(0, NB3)
        tl.store(msg_ptr + coff + bidx, byte.to(tl.uint8), mask=bidx < (n + 4) // 5)

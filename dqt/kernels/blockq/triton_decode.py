"""The Triton decode kernels of :mod:`dqt.kernels.blockq`, several blocks per program; for
each block, unpack and dequantize its codes from every peer's message, sum in peer order,
reduce (copy/mean/vote) and store — the fp32 result is written once. Three kernels, chosen by
:func:`dqt.kernels.blockq.triton_impl.decode`:

* ``decode_kernel`` (bytes): any block; a lane per value, codes read byte by byte (base-3
  trits by multiply-shift, no division);
* ``decode_words_kernel`` (words): 1/2/4/8-bit blocks whose data offset, length and code
  offset are multiples of 4: a 32-bit load per code word and peer, codes tested in place
  (``word & (mask << shift)``), 16-byte stores;
* ``decode_trits_kernel`` (trits): base-3 blocks, a lane per code byte, its five codes from a
  256-entry table (``trit_table``), five accumulators, stores with a stride of 5.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dqt.kernels.blockq.triton_common import (CODE, COLUMNS, DATA, KIND_QSGD, KIND_SIGN_TWO,
                                              KIND_TERNARY, LEN, MODE_MEAN, MODE_VOTE, MSG,
                                              SCALE, SCALE_BF16, SCALE_E8M0, SCALE_FP32,
                                              e8m0_value)
from dqt.kernels.blockq.triton_common import KIND_FP8_E4M3, KIND_FP8_E5M2, fp8_value


@triton.jit
def _pow3_magic(mm):
    """ceil(2¹⁶/3^mm): (b·M) >> 16 = b // 3^mm for every byte b (0..255), no division."""
    return tl.where(mm == 0, 65536, tl.where(mm == 1, 21846, tl.where(mm == 2, 7282,
                    tl.where(mm == 3, 2428, 810))))


@triton.jit
def decode_kernel(msg_ptr, tab_ptr, out_ptr, nblocks, stride, flag_off, inv_n,
                  NPEERS: tl.constexpr, KIND: tl.constexpr, CODE_BITS: tl.constexpr,
                  SCALE_FMT: tl.constexpr, SCALE_BYTES: tl.constexpr, LEVELS: tl.constexpr,
                  LANES: tl.constexpr, NB3: tl.constexpr, BPP: tl.constexpr,
                  MODE: tl.constexpr, HAS_FLAG: tl.constexpr):
    """BPP blocks per program, as a (BPP, groups, 8) tile: the table, the scales and the
    flags are loaded once per block, the codes once per group (a group of 8 values is
    CODE_BITS whole bytes; base-3: a byte of 5 trits in 8 lanes), every peer's loads are
    in flight at once (the peer loop is unrolled) and the fp32 result is stored once."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * BPP + tl.arange(0, BPP).to(tl.int64)[:, None, None]
    bm = blk < nblocks
    data, n, mbase, srel, crel = _table_rows(tab_ptr, blk, bm)
    if CODE_BITS == 0:  # lanes (block, byte gg, trit mm): value 5gg + mm
        gg = tl.arange(0, NB3)[None, :, None]
        mm = tl.arange(0, 8)[None, None, :]
        e = 5 * gg + mm
        m = (mm < 5) & (e < n)
        magic = _pow3_magic(mm)
        gm = gg < (n + 4) // 5
        acc = tl.zeros((BPP, NB3, 8), dtype=tl.float32)
    else:  # lanes (block, group gg, t): value 8gg + t; a group is CODE_BITS bytes
        G: tl.constexpr = LANES // 8
        gg = tl.arange(0, G)[None, :, None]
        t = tl.arange(0, 8)[None, None, :]
        e = 8 * gg + t
        m = e < n
        nbytes = (n * CODE_BITS + 7) // 8
        acc = tl.zeros((BPP, G, 8), dtype=tl.float32)
    for p in tl.static_range(NPEERS):  # unrolled: every peer's loads in flight at once
        base = mbase + p * stride
        s = _scale_bytes(msg_ptr + base + srel, bm, SCALE_FMT)  # sign_two: m₀
        s1 = s
        if KIND == KIND_SIGN_TWO:
            s1 = _scale_bytes(msg_ptr + base + srel + SCALE_BYTES, bm, SCALE_FMT)
        cp = msg_ptr + base + crel
        if CODE_BITS == 0:
            cb = tl.load(cp + gg, mask=gm, other=0).to(tl.int32)
            q = (cb * magic) >> 16  # cb // 3^mm
            c = q - 3 * ((q * 171) >> 9)  # q % 3 (q < 256)
        elif CODE_BITS == 8:
            c = tl.load(cp + e, mask=m, other=0).to(tl.int32)
        elif CODE_BITS <= 4:  # the group's bytes in one 32-bit word
            c = _group_codes(cp, gg, t, nbytes, CODE_BITS, tl.uint32)
        else:  # 5..7 bits: 40..56-bit groups
            c = _group_codes(cp, gg, t, nbytes, CODE_BITS, tl.uint64)
        f = tl.load(msg_ptr + base + flag_off, mask=bm, other=0) if HAS_FLAG else 0
        acc = _add_peer(acc, _decode_code(c, s, s1, KIND, LEVELS), f, p == 0, HAS_FLAG)
    tl.store(out_ptr + data + e, _finish(acc, inv_n, MODE), mask=m)


@triton.jit
def _group_codes(cp, gg, t, nbytes, CODE_BITS: tl.constexpr, WT: tl.constexpr):
    """Code t of each group gg: the group's CODE_BITS bytes joined into one WT word."""
    word = tl.load(cp + gg * CODE_BITS, mask=gg * CODE_BITS < nbytes, other=0).to(WT)
    for b in tl.static_range(1, CODE_BITS):
        wb = tl.load(cp + gg * CODE_BITS + b, mask=gg * CODE_BITS + b < nbytes,
                     other=0).to(WT)
        word = word | (wb << (8 * b))
    return ((word >> (CODE_BITS * t).to(WT)) & ((1 << CODE_BITS) - 1)).to(tl.int32)


@triton.jit
def _add_peer(acc, d, f, FIRST: tl.constexpr, HAS_FLAG: tl.constexpr):
    """acc + d in peer order (d itself for the first peer); NaN where the peer flagged."""
    if HAS_FLAG:
        d = tl.where(f != 0, float("nan"), d)
    if FIRST:
        acc = d
    else:
        acc = acc + d
    return acc


@triton.jit
def _table_rows(tab_ptr, blk, bm):
    """DATA, LEN, MSG, SCALE, CODE of blocks blk (0 where not bm)."""
    row = tab_ptr + blk * COLUMNS
    return (tl.load(row + DATA, mask=bm, other=0), tl.load(row + LEN, mask=bm, other=0),
            tl.load(row + MSG, mask=bm, other=0), tl.load(row + SCALE, mask=bm, other=0),
            tl.load(row + CODE, mask=bm, other=0))


@triton.jit
def _scale_bytes(p, mask, SCALE_FMT: tl.constexpr):
    """A block's scale from its little-endian bytes at p (fp32, bf16, e8m0; none: 1)."""
    if SCALE_FMT == SCALE_FP32:
        s0 = tl.load(p, mask=mask, other=0).to(tl.uint32)
        s1 = tl.load(p + 1, mask=mask, other=0).to(tl.uint32)
        s2 = tl.load(p + 2, mask=mask, other=0).to(tl.uint32)
        s3 = tl.load(p + 3, mask=mask, other=0).to(tl.uint32)
        s = (s0 | (s1 << 8) | (s2 << 16) | (s3 << 24)).to(tl.float32, bitcast=True)
    elif SCALE_FMT == SCALE_BF16:
        s0 = tl.load(p, mask=mask, other=0).to(tl.uint32)
        s1 = tl.load(p + 1, mask=mask, other=0).to(tl.uint32)
        s = ((s0 | (s1 << 8)) << 16).to(tl.float32, bitcast=True)
    elif SCALE_FMT == SCALE_E8M0:
        s = e8m0_value(tl.load(p, mask=mask, other=0).to(tl.uint32))
    else:
        s = 1.0
    return s


@triton.jit
def _decode_code(c, s, s1, KIND: tl.constexpr, LEVELS: tl.constexpr):
    """The value of code c of a block with scale s (sign_two: m₀ = s, m₁ = s1; the
    reference's decode)."""
    if KIND == KIND_SIGN_TWO:
        d = tl.where(c == 1, s1, -s)
    elif KIND == KIND_TERNARY:
        d = tl.where(c == 2, s, tl.where(c == 0, -s, 0.0))
    elif KIND == KIND_FP8_E4M3:
        d = fp8_value(c, 3, 7, 0.001953125) * s
    elif KIND == KIND_FP8_E5M2:
        d = fp8_value(c, 2, 15, 1.52587890625e-05) * s
    elif KIND == KIND_QSGD:
        step = tl.math.div_rn(s, s * 0 + LEVELS)
        # the level as fp32 without the (quarter-rate) int→float unit: 2²³ + lev − 2²³
        lev = ((c >> 1) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        mag = lev * step
        d = tl.where((c & 1) == 1, -mag, mag)
    else:  # KIND_SIGN_MEAN, KIND_SIGN
        d = tl.where(c == 1, s, -s)
    return d


@triton.jit
def _finish(acc, inv_n, MODE: tl.constexpr):
    """copy / mean (× fp32(1/N)) / vote (sign, NaN kept) of the peers' sum."""
    if MODE == MODE_MEAN:
        acc = acc * inv_n
    elif MODE == MODE_VOTE:
        acc = tl.where(acc != acc, acc, tl.where(acc >= 0, 1.0, -1.0))
    return acc


@triton.jit
def _word_scale(mw_ptr, off, mask, SCALE_FMT: tl.constexpr):
    """The scale at byte offset ``off`` of the messages, read through their 32-bit words
    (fp32: a whole word; bf16: half of one; none: 1)."""
    if SCALE_FMT == SCALE_FP32:
        s = tl.load(mw_ptr + (off >> 2), mask=mask, other=0).to(tl.float32, bitcast=True)
    elif SCALE_FMT == SCALE_BF16:
        sw = tl.load(mw_ptr + (off >> 2), mask=mask, other=0).to(tl.uint32, bitcast=True)
        s = (((sw >> (8 * (off & 3)).to(tl.uint32)) & 0xFFFF) << 16).to(tl.float32,
                                                                       bitcast=True)
    elif SCALE_FMT == SCALE_E8M0:
        s = e8m0_value(_msg_byte(mw_ptr, off, mask))
    else:
        s = 1.0
    return s


@triton.jit
def _msg_byte(mw_ptr, off, mask):
    """The byte at byte offset ``off`` of the messages, read through their 32-bit words."""
    w = tl.load(mw_ptr + (off >> 2), mask=mask, other=0).to(tl.uint32, bitcast=True)
    return (w >> (8 * (off & 3)).to(tl.uint32)) & 0xFF


@triton.jit
def decode_words_kernel(mw_ptr, tab_ptr, out_ptr, nblocks, stride, flag_off, inv_n,
                        NPEERS: tl.constexpr, KIND: tl.constexpr, CODE_BITS: tl.constexpr,
                        SCALE_FMT: tl.constexpr, SCALE_BYTES: tl.constexpr,
                        LEVELS: tl.constexpr, LANES: tl.constexpr, BPP: tl.constexpr,
                        MODE: tl.constexpr, HAS_FLAG: tl.constexpr):
    """The decode of blocks whose data, length and codes are 4-aligned
    (:func:`~dqt.kernels.blockq.triton_impl.word_rows`), for 1/2/4/8-bit codes: BPP blocks
    per program as a (BPP, words, 32/k) tile — lane j of word w is value (32/k)·w + j, so
    each code word is one 32-bit load per peer, its codes are constant shifts, and the fp32
    results of a word are contiguous, 16-byte-aligned stores. Same arithmetic, same order as
    :func:`decode_kernel`."""
    V: tl.constexpr = 32 // CODE_BITS
    W: tl.constexpr = LANES // V
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * BPP + tl.arange(0, BPP).to(tl.int64)[:, None, None]
    bm = blk < nblocks
    data, n, mbase, srel, crel = _table_rows(tab_ptr, blk, bm)
    data = tl.multiple_of(data, [4, 4, 4])  # aligned rows only (word_rows)
    n = tl.multiple_of(n, [4, 4, 4])
    gw = tl.arange(0, W)[None, :, None]
    j = tl.arange(0, V)[None, None, :]
    e = V * gw + j
    m = e < n
    nw = tl.maximum((n + V - 1) // V, 1)  # words of codes (reads stay inside them)
    acc = tl.zeros((BPP, W, V), dtype=tl.float32)
    for p in tl.static_range(NPEERS):  # unrolled: every peer's loads in flight at once
        base = mbase + p * stride
        s = _word_scale(mw_ptr, base + srel, bm, SCALE_FMT)  # sign_two: m₀
        s1 = s
        if KIND == KIND_SIGN_TWO:
            s1 = _word_scale(mw_ptr, base + srel + SCALE_BYTES, bm, SCALE_FMT)
        word = tl.load(mw_ptr + ((base + crel) >> 2) + tl.minimum(gw, nw - 1)).to(
            tl.uint32, bitcast=True)
        sh = (CODE_BITS * j).to(tl.uint32)
        cm = word & (((1 << CODE_BITS) - 1) << sh)  # the code, in place: c·2^sh
        if KIND == KIND_TERNARY:
            d = tl.where(cm == (2 << sh), s, tl.where(cm == 0, -s, 0.0))
        elif KIND == KIND_QSGD:
            d = _decode_code((cm >> sh).to(tl.int32), s, s1, KIND, LEVELS)
        elif KIND == KIND_FP8_E4M3:
            d = _decode_code((cm >> sh).to(tl.int32), s, s1, KIND, LEVELS)
        elif KIND == KIND_FP8_E5M2:
            d = _decode_code((cm >> sh).to(tl.int32), s, s1, KIND, LEVELS)
        elif KIND == KIND_SIGN_TWO:  # code 1 is +m₁, code 0 −m₀
            d = tl.where(cm != 0, s1, -s)
        else:  # KIND_SIGN_MEAN, KIND_SIGN: code 1 is +s
            d = tl.where(cm != 0, s, -s)
        f = _msg_byte(mw_ptr, base + flag_off, bm) if HAS_FLAG else 0
        acc = _add_peer(acc, d, f, p == 0, HAS_FLAG)
    tl.store(out_ptr + data + e, _finish(acc, inv_n, MODE), mask=m)


@triton.jit
def _trit_value(codes, s, f, M: tl.constexpr, HAS_FLAG: tl.constexpr):
    """The decoded value of trit M of every byte, from its five codes as 2-bit fields
    (``trit_table``), tested in place: −s / 0 / +s (NaN where flagged)."""
    cm = codes & (3 << (2 * M))
    d = tl.where(cm == (2 << (2 * M)), s, tl.where(cm == 0, -s, 0.0))
    if HAS_FLAG:
        d = tl.where(f != 0, float("nan"), d)
    return d


@triton.jit
def decode_trits_kernel(msg_ptr, lut_ptr, tab_ptr, out_ptr, nblocks, stride, flag_off, inv_n,
                        NPEERS: tl.constexpr, SCALE_FMT: tl.constexpr, BPP: tl.constexpr,
                        NBC: tl.constexpr, NCHUNK: tl.constexpr, MODE: tl.constexpr,
                        HAS_FLAG: tl.constexpr):
    """Base-3 ternary decode, trit-major: BPP blocks per program, their code bytes in
    chunks of NBC; one lane per byte (not per value: no idle lanes), each byte loaded once
    per peer and looked up in ``trit_table`` (its five codes as 2-bit fields; 1 KB, stays
    in L1), the five trits tested in place into five accumulators, value 5b + m of trit m
    stored with a stride of 5 (the five stores fill the lines)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * BPP + tl.arange(0, BPP).to(tl.int64)[:, None]
    bm = blk < nblocks
    data, n, mbase, srel, crel = _table_rows(tab_ptr, blk, bm)
    nbytes = (n + 4) // 5
    for ch in range(NCHUNK):
        b = ch * NBC + tl.arange(0, NBC)[None, :]
        bmask = b < nbytes
        e = 5 * b
        a0 = tl.zeros((BPP, NBC), dtype=tl.float32)
        a1 = a0
        a2 = a0
        a3 = a0
        a4 = a0
        for p in tl.static_range(NPEERS):  # unrolled: every peer's loads in flight at once
            base = mbase + p * stride
            s = _scale_bytes(msg_ptr + base + srel, bm, SCALE_FMT)
            f = 0
            if HAS_FLAG:
                f = tl.load(msg_ptr + base + flag_off, mask=bm, other=0)
            byte = tl.load(msg_ptr + base + crel + b, mask=bmask, other=0).to(tl.int32)
            codes = tl.load(lut_ptr + byte)
            d0 = _trit_value(codes, s, f, 0, HAS_FLAG)
            d1 = _trit_value(codes, s, f, 1, HAS_FLAG)
            d2 = _trit_value(codes, s, f, 2, HAS_FLAG)
            d3 = _trit_value(codes, s, f, 3, HAS_FLAG)
            d4 = _trit_value(codes, s, f, 4, HAS_FLAG)
            if p == 0:
                a0, a1, a2, a3, a4 = d0, d1, d2, d3, d4
            else:
                a0, a1, a2, a3, a4 = a0 + d0, a1 + d1, a2 + d2, a3 + d3, a4 + d4
        o = out_ptr + data + e
        tl.store(o, _finish(a0, inv_n, MODE), mask=e < n)
        tl.store(o + 1, _finish(a1, inv_n, MODE), mask=e + 1 < n)
        tl.store(o + 2, _finish(a2, inv_n, MODE), mask=e + 2 < n)
        tl.store(o + 3, _finish(a3, inv_n, MODE), mask=e + 3 < n)
        tl.store(o + 4, _finish(a4, inv_n, MODE), mask=e + 4 < n)

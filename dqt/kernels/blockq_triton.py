"""The Triton implementation of :mod:`dqt.kernels.blockq`: one program per block.

``encode``: one program per block: load the block (+ S·residual), reduce its statistic (fp64
sums), round the scale, quantize with Philox uniforms (``tl.philox``, the counters of
:mod:`dqt.kernels.philox`; one call per 4 values, its 4 outputs joined into the tile), pack
the codes into bytes (base-3: the tile's codes gathered 5 to a byte) and store them, the
scale bytes and the new residual — one pass over the data. ``decode``: several blocks per
program (``DECODE_TILE`` values, ``DECODE_WARPS`` warps); for each block, unpack and
dequantize the block from every peer's message (base-3 trits by multiply-shift, no division),
sum in peer order, reduce (copy/mean/vote) and store — the fp32 result is written once.
Blocks of 1/2/4/8-bit codes whose data offset, length and code offset are multiples of 4 (every
block of a bucket whose tensors are multiples of 4 values long; the layout pads messages to
whole words) go to the *word* decode kernel instead: a 32-bit load per code word and peer,
codes tested in place (``word & (mask << shift)``), 16-byte stores. Base-3 blocks go to the
*trit* kernel: a lane per code byte, its five codes from a 256-entry table (``trit_table``),
five accumulators, stores with a stride of 5. ``DQT_DECODE_WORDS=0`` / ``DQT_DECODE_TRITS=0``
turn them off (the benchmark times every kernel that can take a scheme).

The arithmetic is the reference's, operation for operation: divisions use ``tl.math.div_rn``
(IEEE round-to-nearest; Triton's ``/`` on fp32 is approximate on NVIDIA GPUs) and kernels are
launched with ``enable_fp_fusion=False`` so ``x + e·S`` is not contracted into an FMA. Under
``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU tensors,
which is how CI checks them against the reference without a GPU.

Importing this module never touches a device; if triton is missing, :func:`available` and
:func:`interpreting` are False.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from dqt.kernels.blockq import CODE, DATA, LEN, MSG, SCALE, f32_recip

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional extra
    triton = None
    tl = None

# Triton decides interpreter vs GPU when a kernel is decorated, i.e. at this import.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KINDS = {"sign_mean": 0, "sign": 1, "ternary": 2, "qsgd": 3}
_SCALES = {"none": 0, "fp32": 1, "bf16": 2, "e8m0": 3}
_MODES = {"copy": 0, "mean": 1, "vote": 2}


def available() -> bool:
    """Triton kernels can run on CUDA tensors here."""
    return triton is not None and not _INTERPRET and torch.cuda.is_available()


def interpreting() -> bool:
    """Triton kernels run through the interpreter on CPU tensors here."""
    return triton is not None and _INTERPRET


if triton is not None:

    @triton.jit
    def _philox_u(key, ctr, q):
        """The four uniforms of counters (q, ctr): value 4q + t gets output t (t = 0..3)."""
        q = q.to(tl.uint32)
        c1 = q * 0 + ctr.to(tl.uint32)
        z = q * 0
        r0, r1, r2, r3 = tl.philox(key, q, c1, z, z)
        return r0, r1, r2, r3

    @triton.jit
    def _to_uniform(r):
        return (r >> 8).to(tl.float32) * 5.9604644775390625e-08

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
        return tl.where(x != x, 0x7FC0, r)

    @triton.jit
    def _e8m0_code(x):
        b = x.to(tl.uint32, bitcast=True)
        e = (b >> 23) & 0xFF
        r = tl.minimum(e + ((b & 0x7FFFFF) >= 3474676).to(tl.uint32), 254)
        r = tl.where(e == 0, 0, r)
        return tl.where(tl.abs(x) < float("inf"), r, 255)  # NaN compares false: 255

    @triton.jit
    def _e8m0_value(e):
        v = (e.to(tl.uint32) << 23).to(tl.float32, bitcast=True)
        return tl.where(e == 0, 0.0, tl.where(e == 255, float("nan"), v))

    @triton.jit
    def _code_and_decode(v, w, u, s, r, step, KIND: tl.constexpr, LEVELS: tl.constexpr):
        """codes (int32) and the decoded values of a block's values v (w: clipped v)."""
        if KIND == 0:
            c = (v >= 0).to(tl.int32)
            d = tl.where(c == 1, s, -s)
        elif KIND == 1:
            c = (v >= 0).to(tl.int32)
            d = tl.where(c == 1, 1.0, -1.0)
        elif KIND == 2:
            keep = (u * s) < tl.abs(w)
            c = tl.where(keep, tl.where(w > 0, 2, 0), 1)
            d = tl.where(c == 2, s, tl.where(c == 0, -s, 0.0))
        else:
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
    def _encode_kernel(x_ptr, tab_ptr, msg_ptr, res_ptr, bad_ptr, S, inv_s, key,
                       KIND: tl.constexpr, CODE_BITS: tl.constexpr, SCALE_FMT: tl.constexpr,
                       LEVELS: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
                       NB3: tl.constexpr, KB: tl.constexpr, HAS_RES: tl.constexpr,
                       HAS_BAD: tl.constexpr, UNIT: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        row = tab_ptr + pid * 8
        data = tl.load(row + 0)
        roff = tl.load(row + 1)
        n = tl.load(row + 2)
        mbase = tl.load(row + 3)
        soff = mbase + tl.load(row + 4)
        coff = mbase + tl.load(row + 5)
        ctr = tl.load(row + 6)
        # lanes (g, h, i) hold value e = 8g + 4h + i: a group of 8 values packs into whole
        # bytes, and (2g + h, i) is its Philox (counter, output) — no shuffles needed
        G: tl.constexpr = BLOCK // 8
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
        if KIND == 0:
            raw = (tl.sum(tl.where(m, tl.abs(v), 0.0).to(tl.float64)) / n64).to(tl.float32)
        elif KIND == 1:
            raw = tl.sum(v * 0) + 1.0
        elif KIND == 2:
            if CLIP > 0:
                mean = (tl.sum(v.to(tl.float64)) / n64).to(tl.float32)
                dv = tl.where(m, v - mean, 0.0).to(tl.float64)
                bound = (CLIP * tl.sqrt(tl.sum(dv * dv) / n64)).to(tl.float32)
                w = tl.minimum(tl.maximum(v, -bound), bound)
            raw = tl.max(tl.where(m, tl.abs(w), 0.0))
        else:
            v64 = v.to(tl.float64)
            raw = tl.sqrt(tl.sum(v64 * v64)).to(tl.float32)
        if SCALE_FMT == 2:
            sbits = _bf16_bits(raw)
            s = (sbits << 16).to(tl.float32, bitcast=True)
        elif SCALE_FMT == 3:
            sbits = _e8m0_code(raw)
            s = _e8m0_value(sbits)
        else:
            sbits = raw.to(tl.uint32, bitcast=True)
            s = raw
        bad = (finite == 0) | (tl.abs(s) >= float("inf")) | (s != s)
        r = s * 0.0
        step = s * 0.0
        if KIND == 3:
            pos = s > 0
            r = tl.where(pos, tl.math.div_rn(s * 0 + 1.0, tl.where(pos, s, 1.0)), 0.0)
            r = tl.where(tl.abs(r) < float("inf"), r, 0.0)
            step = tl.math.div_rn(s, s * 0 + LEVELS)
        if SCALE_FMT == 1:
            t4 = tl.arange(0, 4)
            sb = tl.where(bad, 0x7FC00000, sbits)
            tl.store(msg_ptr + soff + t4, ((sb >> (8 * t4)) & 0xFF).to(tl.uint8))
        elif SCALE_FMT == 2:
            t2 = tl.arange(0, 2)
            sb = tl.where(bad, 0x7FC0, sbits)
            tl.store(msg_ptr + soff + t2, ((sb >> (8 * t2)) & 0xFF).to(tl.uint8))
        elif SCALE_FMT == 3:
            tl.store(msg_ptr + soff, tl.where(bad, 255, sbits).to(tl.uint8))
        if HAS_BAD:
            tl.store(bad_ptr + pid, bad.to(tl.int32))
        good = e * 0 + (1 - bad.to(tl.int32)) > 0  # the block is finite
        if KIND >= 2:
            # one Philox call per counter 2g + h, on a (G, 2) tile (a (G, 2, 1) one would be
            # replicated over the threads of the i axis: 4x the Philox work); its 4 outputs
            # are joined into the last axis: [g, h, a, b] = output 2a + b, i.e. (G, 2, 4)
            q2 = 2 * tl.arange(0, G)[:, None] + tl.arange(0, 2)[None, :]
            r0, r1, r2, r3 = _philox_u(key, ctr, q2)
            rr = tl.join(tl.join(r0, r2), tl.join(r1, r3))
            u = _to_uniform(tl.reshape(rr, (G, 2, 4)))
        else:
            u = v * 0
        c, d = _code_and_decode(v, w, u, s, r, step, KIND, LEVELS)
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
            cf = tl.reshape(c, (BLOCK,))
            idx = tl.reshape(tl.where(ok, ev, 0), (NB3 * 8,))
            c2 = tl.reshape(tl.gather(cf, idx, 0), (NB3, 8))
            c2 = tl.where(ok, c2, 0)
            byte = tl.sum(c2 * _pow3(mm), axis=1)
            bidx = tl.arange(0, NB3)
            tl.store(msg_ptr + coff + bidx, byte.to(tl.uint8), mask=bidx < (n + 4) // 5)

    @triton.jit
    def _pow3_magic(mm):
        """ceil(2¹⁶/3^mm): (b·M) >> 16 = b // 3^mm for every byte b (0..255), no division."""
        return tl.where(mm == 0, 65536, tl.where(mm == 1, 21846, tl.where(mm == 2, 7282,
                        tl.where(mm == 3, 2428, 810))))

    @triton.jit
    def _decode_kernel(msg_ptr, tab_ptr, out_ptr, nblocks, stride, flag_off, inv_n,
                       NPEERS: tl.constexpr, KIND: tl.constexpr, CODE_BITS: tl.constexpr,
                       SCALE_FMT: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
                       NB3: tl.constexpr, BPP: tl.constexpr, MODE: tl.constexpr,
                       HAS_FLAG: tl.constexpr):
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
            G: tl.constexpr = BLOCK // 8
            gg = tl.arange(0, G)[None, :, None]
            t = tl.arange(0, 8)[None, None, :]
            e = 8 * gg + t
            m = e < n
            nbytes = (n * CODE_BITS + 7) // 8
            acc = tl.zeros((BPP, G, 8), dtype=tl.float32)
        for p in tl.static_range(NPEERS):  # unrolled: every peer's loads in flight at once
            base = mbase + p * stride
            s = _scale_bytes(msg_ptr + base + srel, bm, SCALE_FMT)
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
            acc = _add_peer(acc, _decode_code(c, s, KIND, LEVELS), f, p == 0, HAS_FLAG)
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
        row = tab_ptr + blk * 8
        return (tl.load(row + 0, mask=bm, other=0), tl.load(row + 2, mask=bm, other=0),
                tl.load(row + 3, mask=bm, other=0), tl.load(row + 4, mask=bm, other=0),
                tl.load(row + 5, mask=bm, other=0))

    @triton.jit
    def _scale_bytes(p, mask, SCALE_FMT: tl.constexpr):
        """A block's scale from its little-endian bytes at p (fp32, bf16, e8m0; none: 1)."""
        if SCALE_FMT == 1:
            s0 = tl.load(p, mask=mask, other=0).to(tl.uint32)
            s1 = tl.load(p + 1, mask=mask, other=0).to(tl.uint32)
            s2 = tl.load(p + 2, mask=mask, other=0).to(tl.uint32)
            s3 = tl.load(p + 3, mask=mask, other=0).to(tl.uint32)
            s = (s0 | (s1 << 8) | (s2 << 16) | (s3 << 24)).to(tl.float32, bitcast=True)
        elif SCALE_FMT == 2:
            s0 = tl.load(p, mask=mask, other=0).to(tl.uint32)
            s1 = tl.load(p + 1, mask=mask, other=0).to(tl.uint32)
            s = ((s0 | (s1 << 8)) << 16).to(tl.float32, bitcast=True)
        elif SCALE_FMT == 3:
            s = _e8m0_value(tl.load(p, mask=mask, other=0).to(tl.uint32))
        else:
            s = 1.0
        return s

    @triton.jit
    def _decode_code(c, s, KIND: tl.constexpr, LEVELS: tl.constexpr):
        """The value of code c of a block with scale s (the reference's decode)."""
        if KIND <= 1:
            d = tl.where(c == 1, s, -s)
        elif KIND == 2:
            d = tl.where(c == 2, s, tl.where(c == 0, -s, 0.0))
        else:
            step = tl.math.div_rn(s, s * 0 + LEVELS)
            # the level as fp32 without the (quarter-rate) int→float unit: 2²³ + lev − 2²³
            lev = ((c >> 1) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            mag = lev * step
            d = tl.where((c & 1) == 1, -mag, mag)
        return d

    @triton.jit
    def _finish(acc, inv_n, MODE: tl.constexpr):
        """copy / mean (× fp32(1/N)) / vote (sign, NaN kept) of the peers' sum."""
        if MODE == 1:
            acc = acc * inv_n
        elif MODE == 2:
            acc = tl.where(acc != acc, acc, tl.where(acc >= 0, 1.0, -1.0))
        return acc

    @triton.jit
    def _msg_byte(mw_ptr, off, mask):
        """The byte at byte offset ``off`` of the messages, read through their 32-bit words."""
        w = tl.load(mw_ptr + (off >> 2), mask=mask, other=0).to(tl.uint32, bitcast=True)
        return (w >> (8 * (off & 3)).to(tl.uint32)) & 0xFF

    @triton.jit
    def _decode_words_kernel(mw_ptr, tab_ptr, out_ptr, nblocks, stride, flag_off, inv_n,
                             NPEERS: tl.constexpr, KIND: tl.constexpr, CODE_BITS: tl.constexpr,
                             SCALE_FMT: tl.constexpr, LEVELS: tl.constexpr, BLOCK: tl.constexpr,
                             BPP: tl.constexpr, MODE: tl.constexpr, HAS_FLAG: tl.constexpr):
        """The decode of blocks whose data, length and codes are 4-aligned (:func:`word_rows`),
        for 1/2/4/8-bit codes: BPP blocks per program as a (BPP, words, 32/k) tile — lane j of
        word w is value (32/k)·w + j, so each code word is one 32-bit load per peer, its codes
        are constant shifts, and the fp32 results of a word are contiguous, 16-byte-aligned
        stores. Same arithmetic, same order as :func:`_decode_kernel`."""
        V: tl.constexpr = 32 // CODE_BITS
        W: tl.constexpr = BLOCK // V
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
            if SCALE_FMT == 1:
                s = tl.load(mw_ptr + ((base + srel) >> 2), mask=bm, other=0).to(
                    tl.float32, bitcast=True)
            elif SCALE_FMT == 2:
                sw = tl.load(mw_ptr + ((base + srel) >> 2), mask=bm, other=0).to(
                    tl.uint32, bitcast=True)
                s = (((sw >> (8 * ((base + srel) & 3)).to(tl.uint32)) & 0xFFFF) << 16).to(
                    tl.float32, bitcast=True)
            elif SCALE_FMT == 3:
                s = _e8m0_value(_msg_byte(mw_ptr, base + srel, bm))
            else:
                s = 1.0
            word = tl.load(mw_ptr + ((base + crel) >> 2) + tl.minimum(gw, nw - 1)).to(
                tl.uint32, bitcast=True)
            sh = (CODE_BITS * j).to(tl.uint32)
            cm = word & (((1 << CODE_BITS) - 1) << sh)  # the code, in place: c·2^sh
            if KIND <= 1:
                d = tl.where(cm != 0, s, -s)
            elif KIND == 2:
                d = tl.where(cm == (2 << sh), s, tl.where(cm == 0, -s, 0.0))
            else:
                d = _decode_code((cm >> sh).to(tl.int32), s, KIND, LEVELS)
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
    def _decode_trits_kernel(msg_ptr, lut_ptr, tab_ptr, out_ptr, nblocks, stride, flag_off, inv_n,
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


# decode: values (lanes) per program and warps per program; blocks smaller than the tile are
# batched BPP to a program so each program has enough loads in flight (the benchmark sweeps these)
DECODE_TILE = 2048
# the word kernel (aligned rows of 1/2/4/8-bit codes); DQT_DECODE_WORDS=0 turns it off (A/B)
DECODE_WORDS = os.environ.get("DQT_DECODE_WORDS", "1") != "0"
WORDS_TILE = 2048
WORDS_WARPS = 4
# blocks under this many values keep the byte kernel: with 128-value blocks (onebit) the word
# kernel compiles to more instructions per value (per-block work, 16 blocks per program) and the
# byte kernel was measured at 85-90 % of clone on an H100; the benchmark times both
WORDS_MIN_BLOCK = 256
# base-3: the trit-major kernel (a lane per code byte, chunks of TRITS_CHUNK bytes, about
# TRITS_TILE bytes per program); DQT_DECODE_TRITS=0 turns it off (A/B)
DECODE_TRITS = os.environ.get("DQT_DECODE_TRITS", "1") != "0"
TRITS_CHUNK = 512
TRITS_TILE = 512
ENCODE_VALUES_PER_THREAD = 8
DECODE_WARPS = 4


def _block(spec) -> int:
    return max(16, triton.next_power_of_2(spec.block))  # lanes: 16 .. next power of two


def _kb(spec) -> int:
    return triton.next_power_of_2(max(1, spec.code_bits))


def _warps(block: int) -> int:
    """encode: one program per block, ENCODE_VALUES_PER_THREAD values per thread (more values
    per thread amortise the per-block work: table, reductions, scale bytes)."""
    return max(1, min(8, block // (32 * ENCODE_VALUES_PER_THREAD)))


def encode(spec, x: Tensor, table: Tensor, msg: Tensor, residual: Tensor | None,
           grad_scale: float, key: int, bad: Tensor | None) -> None:
    nblocks = table.shape[0]
    if nblocks == 0:
        return
    BLOCK = _block(spec)
    nb3 = triton.next_power_of_2(-(-spec.block // 5))
    dummy = x
    _encode_kernel[(nblocks,)](
        x, table, msg, residual if residual is not None else dummy,
        bad if bad is not None else table, float(grad_scale), f32_recip(grad_scale), int(key),
        KIND=_KINDS[spec.kind], CODE_BITS=spec.code_bits, SCALE_FMT=_SCALES[spec.scale],
        LEVELS=spec.levels, CLIP=float(spec.clip), BLOCK=BLOCK, NB3=nb3, KB=_kb(spec),
        HAS_RES=residual is not None, HAS_BAD=bad is not None, UNIT=float(grad_scale) == 1.0,
        num_warps=_warps(BLOCK), **({} if _INTERPRET else {"enable_fp_fusion": False}))


def word_rows(spec, table: Tensor) -> Tensor:
    """Which rows of ``table`` the word kernel may decode (bool, on the table's device): data
    offset, length and code offset multiples of 4, the scale inside one 32-bit word. Computed
    once per table (cached on it; recomputed if the table is written in place)."""
    key = (table._version, spec.code_bits, spec.scale)
    cached = getattr(table, "_dqt_word_rows", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    t = table.cpu()
    ok = (t[:, DATA] % 4 == 0) & (t[:, LEN] % 4 == 0) & ((t[:, MSG] + t[:, CODE]) % 4 == 0)
    if spec.scale == "fp32":
        ok &= (t[:, MSG] + t[:, SCALE]) % 4 == 0
    elif spec.scale == "bf16":
        ok &= (t[:, MSG] + t[:, SCALE]) % 2 == 0
    rows = ok.to(table.device)
    table._dqt_word_rows = (key, rows)
    return rows


def decode_path(spec, msg: Tensor, peer_stride: int) -> str:
    """"words" where the word kernel can take aligned rows of this call, else "bytes"."""
    ok = (DECODE_WORDS and spec.code_bits in (1, 2, 4, 8) and _block(spec) >= WORDS_MIN_BLOCK
          and _block(spec) * spec.code_bits >= 32
          and peer_stride % 4 == 0 and msg.numel() % 4 == 0 and msg.data_ptr() % 4 == 0)
    return "words" if ok else "bytes"


def decode(spec, msg: Tensor, table: Tensor, out: Tensor, npeers: int, peer_stride: int,
           flag_off: int, mode: str) -> None:
    nblocks = table.shape[0]
    if nblocks == 0:
        return
    if decode_path(spec, msg, peer_stride) == "words":
        rows = word_rows(spec, table)
        parts = getattr(table, "_dqt_word_parts", None)
        if parts is None or parts[0] is not rows:
            aligned, rest = table[rows], table[~rows]
            parts = (rows, aligned.contiguous(), rest.contiguous())
            table._dqt_word_parts = parts
        _, aligned, rest = parts
        if aligned.shape[0]:
            _decode_words(spec, msg, aligned, out, npeers, peer_stride, flag_off, mode)
        table = rest
        if table.shape[0] == 0:
            return
    _decode_bytes(spec, msg, table, out, npeers, peer_stride, flag_off, mode)


def _decode_words(spec, msg, table, out, npeers, peer_stride, flag_off, mode) -> None:
    BLOCK = _block(spec)
    nblocks = table.shape[0]
    bpp = max(1, min(WORDS_TILE // BLOCK, triton.next_power_of_2(nblocks)))
    _decode_words_kernel[(triton.cdiv(nblocks, bpp),)](
        msg.view(torch.int32), table, out, nblocks, int(peer_stride), int(flag_off),
        f32_recip(npeers), NPEERS=int(npeers), KIND=_KINDS[spec.kind],
        CODE_BITS=spec.code_bits, SCALE_FMT=_SCALES[spec.scale], LEVELS=spec.levels,
        BLOCK=BLOCK, BPP=bpp, MODE=_MODES[mode], HAS_FLAG=flag_off >= 0,
        num_warps=max(1, min(WORDS_WARPS, bpp * BLOCK // 128)),
        **({} if _INTERPRET else {"enable_fp_fusion": False}))


_TRIT_TABLES: dict = {}


def trit_table(device: torch.device) -> Tensor:
    """int32 (256,): entry b holds the five codes of base-3 byte b as 2-bit fields (code m at
    bits 2m, 2m+1), made from :func:`dqt.kernels.bitpack.unpack_base3` itself (every byte,
    the 13 that no encoder writes included), so the lookup decodes what the reference does."""
    t = _TRIT_TABLES.get(device)
    if t is None:
        from dqt.kernels.bitpack import unpack_base3

        codes = unpack_base3(torch.arange(256, dtype=torch.uint8), 5 * 256).view(256, 5)
        t = (codes.to(torch.int32) << (2 * torch.arange(5, dtype=torch.int32))).sum(1)
        t = _TRIT_TABLES[device] = t.to(torch.int32).to(device)
    return t


def _decode_trits(spec, msg, table, out, npeers, peer_stride, flag_off, mode) -> None:
    nblocks = table.shape[0]
    nb = -(-spec.block // 5)  # code bytes of a full block
    nbc = min(TRITS_CHUNK, triton.next_power_of_2(nb))
    bpp = max(1, min(TRITS_TILE // nbc, triton.next_power_of_2(nblocks)))
    _decode_trits_kernel[(triton.cdiv(nblocks, bpp),)](
        msg, trit_table(msg.device), table, out, nblocks, int(peer_stride), int(flag_off),
        f32_recip(npeers),
        NPEERS=int(npeers), SCALE_FMT=_SCALES[spec.scale], BPP=bpp, NBC=nbc,
        NCHUNK=-(-nb // nbc), MODE=_MODES[mode], HAS_FLAG=flag_off >= 0,
        num_warps=max(1, min(DECODE_WARPS, bpp * nbc // 128)),
        **({} if _INTERPRET else {"enable_fp_fusion": False}))


def _decode_bytes(spec, msg, table, out, npeers, peer_stride, flag_off, mode) -> None:
    nblocks = table.shape[0]
    if spec.code_bits == 0 and DECODE_TRITS:
        _decode_trits(spec, msg, table, out, npeers, peer_stride, flag_off, mode)
        return
    BLOCK = _block(spec)
    nb3 = triton.next_power_of_2(-(-spec.block // 5))
    lanes = 8 * nb3 if spec.code_bits == 0 else BLOCK
    bpp = max(1, min(DECODE_TILE // lanes, triton.next_power_of_2(nblocks)))
    _decode_kernel[(triton.cdiv(nblocks, bpp),)](
        msg, table, out, nblocks, int(peer_stride), int(flag_off), f32_recip(npeers),
        NPEERS=int(npeers), KIND=_KINDS[spec.kind], CODE_BITS=spec.code_bits,
        SCALE_FMT=_SCALES[spec.scale], LEVELS=spec.levels, BLOCK=BLOCK, NB3=nb3, BPP=bpp,
        MODE=_MODES[mode], HAS_FLAG=flag_off >= 0,
        num_warps=max(1, min(DECODE_WARPS, bpp * lanes // 128)),
        **({} if _INTERPRET else {"enable_fp_fusion": False}))

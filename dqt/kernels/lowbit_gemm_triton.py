"""Triton kernels of :mod:`dqt.kernels.lowbit_gemm`.

* ``_gemv_kernel`` (M ≤ 8, decoding): one program per (BLOCK_N output columns, activation
  row, K slice) streams its part of the packed weight, BLOCK_KW int32 rows at a time; each
  thread unpacks its own words in registers with three instructions per code (mask the code
  inside its 16-bit half, which carries the fp32 exponent of 2²³ on top; subtract 2²³; one FMA
  with the activation pre-scaled by 2⁻ˢ), the zero point is taken out of the loop
  (Σx·(c − z) = Σx·c − z·Σx) and the scale applied in the epilogue. K slices (split-K, for
  enough programs in flight at batch 1) meet in one launch: each writes an fp32 partial, the
  last to arrive at a per-tile counter sums them in slice order and resets the counter (the
  workspace is cached per device and size: launches on one stream only).
* ``_gemm_kernel`` (M > 8): (BLOCK_M × BLOCK_N) output tiles; each K step unpacks a
  (BLOCK_KW·PER × BLOCK_N) weight tile to the activation dtype (code − zero is exact there)
  and feeds one ``tl.dot``, fp32 accumulation (``input_precision="ieee"`` for fp32
  activations). (One dot per code position instead measured 2–6x slower at M = 128.)

Tile sizes are chosen per (M bucket, N, K, bits, dtype) by timing a few configurations once
on the GPU (``triton.testing.do_bench``, median); under the interpreter, or with
``DQT_TRITON_AUTOTUNE=0`` (the test suite sets it), a fixed default is used.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GEMV_MAX_M = 8
# GEMV: (BLOCK_N, BLOCK_KW int32 rows per step, warps, K slices); more slices put more
# programs in flight for weights with few columns
_GEMV_CONFIGS = [(256, 4, 2, 8), (64, 16, 4, 1), (256, 4, 2, 32), (256, 8, 2, 16),
                 (512, 4, 2, 16), (512, 4, 4, 8), (1024, 4, 4, 4), (128, 8, 2, 16),
                 (64, 16, 4, 16), (128, 4, 1, 32), (512, 2, 2, 32), (256, 16, 4, 8),
                 (128, 8, 2, 32), (64, 8, 2, 32), (256, 8, 4, 16)]
_GEMM_CONFIGS = [(64, 64, 2, 4, 3), (64, 128, 2, 4, 3), (128, 64, 2, 8, 3), (128, 128, 2, 8, 3),
                 (32, 64, 4, 4, 4), (16, 64, 4, 4, 4)]  # BM, BN, KW words, warps, stages
_BEST: dict[tuple, tuple] = {}


def available(device: torch.device) -> bool:
    if triton is None:
        return False
    return _INTERPRET if device.type == "cpu" else device.type == "cuda"


if triton is not None:

    @triton.jit
    def _to_float(codes):
        """int codes in [0, 2²³) → fp32 exactly, without the int→float conversion unit (a
        quarter-rate path on NVIDIA GPUs): 0x4B000000 | c is the float 2²³ + c."""
        return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _gemv_step(acc, xacc, xrow, w_ptr, kw0, kw_hi, n, nm, N, K, BITS: tl.constexpr,
                   PER: tl.constexpr, BLOCK_KW: tl.constexpr, MASKED: tl.constexpr):
        """One step of BLOCK_KW packed rows: acc += x·code·2^s... (see _gemv_kernel)."""
        kw = kw0 + tl.arange(0, BLOCK_KW)
        kk = kw0 * PER + tl.arange(0, BLOCK_KW * PER)
        if MASKED:
            km = kw < kw_hi
            wp = tl.load(w_ptr + kw[:, None] * N + n[None, :], mask=km[:, None] & nm[None, :],
                         other=0)
            xacc += tl.load(xrow + kk, mask=(kk < kw_hi * PER) & (kk < K), other=0.0).to(tl.float32)
        else:
            wp = tl.load(w_ptr + kw[:, None] * N + n[None, :], mask=nm[None, :], other=0)
            xacc += tl.load(xrow + kk).to(tl.float32)
        MASK: tl.constexpr = (1 << BITS) - 1
        # each 16-bit half with the exponent bits 0x4B00 on top: then one AND per code,
        # with the mask (code bits | 0xFFFF0000), gives 2²³ + code·2ˢ as fp32 bits
        lo = (wp & 0xFFFF) | 0x4B000000
        hi = ((wp >> 16) & 0xFFFF) | 0x4B000000
        for i in tl.static_range(PER):
            k = kw * PER + i
            if MASKED:
                xk = tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32)
            else:
                xk = tl.load(xrow + k).to(tl.float32)
            if i * BITS < 16:
                bits = lo & (-65536 | (MASK << (i * BITS)))
            else:
                bits = hi & (-65536 | (MASK << (i * BITS - 16)))
            w = bits.to(tl.float32, bitcast=True) - 8388608.0  # code·2^s, exact
            acc += (xk * (1.0 / (1 << ((i * BITS) % 16))))[:, None] * w
        return acc, xacc

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, KW,
                     KW_SPLIT, stride_xm, stride_ym, BITS: tl.constexpr, PER: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT: tl.constexpr):
        """BLOCK_N columns × one activation row (program axis 1) × one K slice (axis 2).

        Each thread keeps whole int32 words and unpacks them in registers without shifting
        each code down: code i of a word sits at bit s = i·BITS of its 16-bit half h, and
        ``(h & (mask << s)) | 0x4B000000`` read as fp32 is 2²³ + code·2ˢ exactly, so one LOP3,
        one FADD and one FFMA with the activation pre-scaled by 2⁻ˢ (exact: a power of two)
        accumulate x·code. The zero point leaves the loop: Σ x·(c − z) = Σ x·c − z·Σ x; the
        scale is applied in the epilogue. With SPLIT > 1 every K slice writes its fp32 partial
        to a workspace and bumps a per-tile counter; the last slice to arrive sums the partials
        in slice order (deterministic), writes y and resets the counter — one launch."""
        pid = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        kslice = tl.program_id(2)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        xacc = tl.zeros((BLOCK_KW * PER,), dtype=tl.float32)
        kw_lo = kslice * KW_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_SPLIT, KW)
        xrow = x_ptr + row * stride_xm
        # whole steps inside the slice and inside K run without masks; the rest with them
        kw_full = tl.minimum(kw_hi, K // PER)
        kw_mid = kw_lo + tl.maximum(kw_full - kw_lo, 0) // BLOCK_KW * BLOCK_KW
        for kw0 in range(kw_lo, kw_mid, BLOCK_KW):
            acc, xacc = _gemv_step(acc, xacc, xrow, w_ptr, kw0, kw_hi, n, nm, N, K, BITS, PER,
                                   BLOCK_KW, False)
        for kw0 in range(kw_mid, kw_hi, BLOCK_KW):
            acc, xacc = _gemv_step(acc, xacc, xrow, w_ptr, kw0, kw_hi, n, nm, N, K, BITS, PER,
                                   BLOCK_KW, True)
        zero = tl.load(zero_ptr + n, mask=nm, other=0.0)
        part = tl.sum(acc, axis=0) - zero * tl.sum(xacc, axis=0)
        scale = tl.load(scale_ptr + n, mask=nm, other=0.0)
        if SPLIT == 1:
            tl.store(y_ptr + row * stride_ym + n, (part * scale).to(y_ptr.dtype.element_ty),
                     mask=nm)
        else:
            nt = tl.num_programs(0)
            wsrow = ws_ptr + (row * SPLIT) * N
            tl.store(wsrow + kslice * N + n, part, mask=nm)
            tl.debug_barrier()  # every thread's partial is written before the release below
            cnt = cnt_ptr + row * nt + pid
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel")
            if arrived == SPLIT - 1:  # the last slice of this tile: reduce in slice order
                tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for j in tl.static_range(SPLIT):
                    pj = tl.load(wsrow + j * N + n, mask=nm & ((n * 0 + kslice) != j), other=0.0,
                                 cache_modifier=".cg")
                    tot += tl.where(kslice == j, part, pj)
                tl.store(y_ptr + row * stride_ym + n, (tot * scale).to(y_ptr.dtype.element_ty),
                         mask=nm)
                tl.atomic_xchg(cnt, 0)  # ready for the next launch

    @triton.jit
    def _unpack(wp, zero, BITS: tl.constexpr, PER: tl.constexpr, BLOCK_KW: tl.constexpr,
                BLOCK_N: tl.constexpr):
        """int32 words (BLOCK_KW, BLOCK_N) → (BLOCK_KW·PER, BLOCK_N) fp32 values code − zero."""
        i = tl.arange(0, PER)
        codes = (wp[:, None, :] >> (i * BITS)[None, :, None]) & ((1 << BITS) - 1)
        w = _to_float(codes) - zero[None, None, :]
        return tl.reshape(w, (BLOCK_KW * PER, BLOCK_N))

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, y_ptr, M, N, K, KW, stride_xm,
                     stride_ym, BITS: tl.constexpr, PER: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, IEEE: tl.constexpr):
        """(BLOCK_M × BLOCK_N) tiles: per K step a (BLOCK_KW·PER × BLOCK_N) weight tile is
        unpacked to the activation dtype and fed to one ``tl.dot``."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mm, nm = m < M, n < N
        zero = tl.load(zero_ptr + n, mask=nm, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kw0 in range(0, KW, BLOCK_KW):
            kw = kw0 + tl.arange(0, BLOCK_KW)
            wp = tl.load(w_ptr + kw[:, None] * N + n[None, :],
                         mask=(kw < KW)[:, None] & nm[None, :], other=0)
            w = _unpack(wp, zero, BITS, PER, BLOCK_KW, BLOCK_N).to(x_ptr.dtype.element_ty)
            k = kw0 * PER + tl.arange(0, BLOCK_KW * PER)
            xk = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :],
                         mask=mm[:, None] & (k < K)[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xk, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xk, w, acc)
        scale = tl.load(scale_ptr + n, mask=nm, other=0.0)
        y = acc * scale[None, :]
        tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mm[:, None] & nm[None, :])


_WS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _workspace(device: torch.device, split: int, m: int, n: int, tiles: int
               ) -> tuple[Tensor, Tensor]:
    """Split-K partials (fp32) and per-tile arrival counters (int32, zero between launches:
    the last program of a tile resets its counter). Cached per device and size; launches on one
    stream use them one after the other."""
    key = (device, split * m * n, m * tiles)
    if key not in _WS:
        _WS[key] = (torch.empty(split * m * n, dtype=torch.float32, device=device),
                    torch.zeros(m * tiles, dtype=torch.int32, device=device))
    return _WS[key]


def _launch(x: Tensor, w, y: Tensor, cfg: tuple) -> None:
    M, K = x.shape
    per = 32 // w.bits
    kw_rows = w.packed.shape[0]
    if M <= GEMV_MAX_M:
        bn, bkw, warps, split = cfg
        bkw = min(bkw, triton.next_power_of_2(kw_rows))
        split = max(1, min(split, triton.cdiv(kw_rows, bkw)))  # no empty K slices
        kw_split = triton.cdiv(triton.cdiv(kw_rows, split), bkw) * bkw
        tiles = triton.cdiv(w.n, bn)
        ws, cnt = _workspace(y.device, split, M, w.n, tiles) if split > 1 else (y, y)
        _gemv_kernel[(tiles, M, split)](
            x, w.packed, w.scale, w.zero, y, ws, cnt, w.n, K, kw_rows, kw_split, x.stride(0),
            y.stride(0), BITS=w.bits, PER=per, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT=split,
            num_warps=warps)
    else:
        bm, bn, bkw, warps, stages = cfg
        bkw = max(bkw, 16 // per)  # tl.dot needs K tiles of at least 16
        grid = (triton.cdiv(M, bm), triton.cdiv(w.n, bn))
        _gemm_kernel[grid](
            x, w.packed, w.scale, w.zero, y, M, w.n, K, kw_rows, x.stride(0), y.stride(0),
            BITS=w.bits, PER=per, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw,
            IEEE=x.dtype == torch.float32, num_warps=warps,
            **({} if _INTERPRET else {"num_stages": stages}))


def _choose(x: Tensor, w) -> tuple:
    M = x.shape[0]
    configs = _GEMV_CONFIGS if M <= GEMV_MAX_M else _GEMM_CONFIGS
    if _INTERPRET:
        return (32, 4, 4, 2) if M <= GEMV_MAX_M else (16, 32, 2, 4, 1)
    if os.environ.get("DQT_TRITON_AUTOTUNE", "1") == "0":
        return configs[1] if M <= GEMV_MAX_M else configs[0]
    key = (min(M, GEMV_MAX_M + 1) if M <= GEMV_MAX_M else triton.next_power_of_2(M), w.n, w.k,
           w.bits, x.dtype)
    if key not in _BEST:
        y = torch.empty(M, w.n, dtype=x.dtype, device=x.device)
        times = {}
        for cfg in configs:
            try:
                times[cfg] = triton.testing.do_bench(lambda: _launch(x, w, y, cfg), warmup=5,
                                                     rep=20, return_mode="median")
            except Exception:  # a config that does not fit (shared memory, registers)
                continue
        _BEST[key] = min(times, key=times.get)
    return _BEST[key]


def matmul(x: Tensor, w) -> Tensor:
    """(M, K) activations × packed (N, K) weight → (M, N) in x's dtype."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be fp16, bf16 or fp32; got {x.dtype}")
    y = torch.empty(x.shape[0], w.n, dtype=x.dtype, device=x.device)
    if x.shape[0] and w.n:
        _launch(x, w, y, _choose(x, w))
    return y

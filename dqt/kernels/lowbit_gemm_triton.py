"""Triton kernels of :mod:`dqt.kernels.lowbit_gemm`.

* ``_gemv_kernel`` (M ≤ 8, decoding): one program per (BLOCK_N output columns, activation
  row, K slice) streams its part of the packed weight, BLOCK_KW int32 rows at a time; each
  thread unpacks its own words in registers (one shift and one mask per code, no layout
  shuffles), subtracts the zero point, accumulates x·w elementwise in fp32 and reduces over K
  once; the scale is applied in the epilogue.
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
_GEMV_CONFIGS = [(128, 16, 4, 1), (64, 16, 4, 1), (128, 16, 4, 4), (64, 32, 4, 4),
                 (128, 8, 4, 8), (256, 8, 8, 4), (64, 16, 4, 8), (32, 32, 4, 8)]
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
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, y_ptr, N, K, KW, KW_SPLIT, stride_xm,
                     stride_ym, BITS: tl.constexpr, PER: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_KW: tl.constexpr, SPLIT: tl.constexpr):
        """BLOCK_N columns × one activation row (program axis 1) × one K slice (axis 2).
        Each thread keeps whole int32 words and unpacks them in registers, one shift at a time
        (static loop over the PER codes of a word), accumulating x·(code − zero) elementwise
        in (BLOCK_KW, BLOCK_N) fp32; one reduction over K at the end. With SPLIT > 1 the K
        slices add into an fp32 output atomically."""
        pid = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        kslice = tl.program_id(2)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        zero = tl.load(zero_ptr + n, mask=nm, other=0.0)
        acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
        kw_lo = kslice * KW_SPLIT
        kw_hi = tl.minimum(kw_lo + KW_SPLIT, KW)
        xrow = x_ptr + row * stride_xm
        for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
            kw = kw0 + tl.arange(0, BLOCK_KW)
            km = kw < kw_hi
            wp = tl.load(w_ptr + kw[:, None] * N + n[None, :], mask=km[:, None] & nm[None, :],
                         other=0)
            for i in tl.static_range(PER):
                k = kw * PER + i
                xk = tl.load(xrow + k, mask=km & (k < K), other=0.0).to(tl.float32)
                w = _to_float((wp >> (i * BITS)) & ((1 << BITS) - 1)) - zero[None, :]
                acc += xk[:, None] * w
        scale = tl.load(scale_ptr + n, mask=nm, other=0.0)
        y = tl.sum(acc, axis=0) * scale
        if SPLIT == 1:
            tl.store(y_ptr + row * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=nm)
        else:
            tl.atomic_add(y_ptr + row * stride_ym + n, y, mask=nm)

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


def _launch(x: Tensor, w, y: Tensor, cfg: tuple) -> None:
    M, K = x.shape
    per = 32 // w.bits
    kw_rows = w.packed.shape[0]
    if M <= GEMV_MAX_M:
        bn, bkw, warps, split = cfg
        kw_split = triton.cdiv(triton.cdiv(kw_rows, split), bkw) * bkw
        out = y if split == 1 else torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        _gemv_kernel[(triton.cdiv(w.n, bn), M, split)](
            x, w.packed, w.scale, w.zero, out, w.n, K, kw_rows, kw_split, x.stride(0),
            out.stride(0), BITS=w.bits, PER=per, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT=split,
            num_warps=warps)
        if split > 1:
            y.copy_(out)
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

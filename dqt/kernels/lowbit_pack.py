"""Packed low-bit weights for inference GEMMs: the storage layout and its pure-torch reference.

A weight matrix W (N output features × K input features; a conv weight flattened to
(out_channels, in_channels·kh·kw)) is stored as unsigned integer codes plus per-output-channel
affine parameters::

    W[n, k] = scale[n] · (code[n, k] − zero[n])

* ``bits`` ∈ {1, 2, 4, 8}; codes are in [0, 2^bits).
* 1-bit (BNN/BWN/XNOR, ±α):  code = 1 if w ≥ 0 else 0, zero = ½, scale = 2α  → α·(2c − 1);
* ternary (TWN/TTQ, {−α, 0, +α}): 2-bit code t + 1 ∈ {0, 1, 2}, zero = 1, scale = α;
* k-bit uniform (DoReFa, INT4, UINT8 affine r = S(q − Z), Jacob et al. 2018): zero = Z, scale = S.

(TTQ's two scales W_p ≠ W_n are not affine in one code; its export stores the
dequantized-exact values through ``zero``/``scale`` only when W_p = W_n, see ``dqt.quant``.)

**Packing (the layout the GEMM kernels read):** codes are packed *along K* (the reduction axis)
into int32 words, LSB-first, ``per = 32 // bits`` codes per word, N contiguous — gemlite's
layout (``docs/kernels.md``, packed low-bit GEMV/GEMM)::

    packed[w, n] = Σ_{i < per} code[n, w·per + i] << (i·bits),   shape (ceil(K / per), N)

K is zero-padded to a multiple of ``per`` (padding codes are 0 and are multiplied by the zero
activations the kernels pad with, so they never contribute). Words are stored as ``torch.int32``
(two's complement: bit 31 set reads negative), because torch has no general uint32 arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BITS", "dequantize_weight", "pack_weight", "packed_rows", "unpack_weight"]

BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}; got {bits!r}")
    return 32 // bits


def packed_rows(k: int, bits: int) -> int:
    """Rows of the packed matrix for K input features: ceil(K / (32 // bits))."""
    per = _check_bits(bits)
    return -(-k // per)


def pack_weight(codes: Tensor, bits: int) -> Tensor:
    """uint8/int codes (N, K) in [0, 2^bits) → int32 (ceil(K/per), N), packed along K."""
    per = _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_weight takes codes of shape (N, K); got {tuple(codes.shape)}")
    n, k = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must be in [0, {1 << bits}) for bits={bits}")
    rows = packed_rows(k, bits)
    c = torch.zeros(n, rows * per, dtype=torch.int64, device=codes.device)
    c[:, :k] = codes.to(torch.int64)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c.view(n, rows, per) << shifts).sum(-1)  # disjoint bits: sum == or, < 2^32
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # as two's complement
    return words.to(torch.int32).t().contiguous()


def unpack_weight(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_weight`: int32 (ceil(K/per), N) → uint8 codes (N, K)."""
    per = _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_weight takes an int32 (rows, N) tensor; got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if packed.shape[0] != packed_rows(k, bits):
        raise ValueError(f"packed has {packed.shape[0]} rows; K={k} at {bits} bits needs "
                         f"{packed_rows(k, bits)}")
    words = packed.t().to(torch.int64) & 0xFFFFFFFF  # (N, rows) as unsigned
    shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
    codes = (words[:, :, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(words.shape[0], -1)[:, :k].to(torch.uint8)


def dequantize_weight(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, k: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """W (N, K) = scale[n]·(code[n, k] − zero[n]), computed in fp32 and cast to ``dtype``."""
    codes = unpack_weight(packed, bits, k).to(torch.float32)
    w = scale.to(torch.float32)[:, None] * (codes - zero.to(torch.float32)[:, None])
    return w.to(dtype)

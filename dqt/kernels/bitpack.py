"""Bit packing for the wire: exact, vectorized, pure torch, any device (the reference the fused
kernels of :mod:`dqt.kernels.blockq` are checked against).

Every function takes and returns 1-D tensors; packed buffers are ``torch.uint8``. Bit order is
LSB-first within a byte, and whatever pads the last byte (bits or trits) is 0, so a message is a
deterministic function of its values and two equal inputs pack to equal bytes.

Formats, for n values (value i, byte j):

* ``pack_bits``  — 1 bit/value:  value i → byte i//8, bit i%8.                ceil(n/8) bytes
* ``pack_2bit``  — 2 bits/value: value i → byte i//4, bits 2·(i%4), 2·(i%4)+1. ceil(n/4) bytes
* ``pack_base3`` — 5 trits/byte: byte j = t₀ + 3t₁ + 9t₂ + 27t₃ + 81t₄ for the trits
  5j … 5j+4 (missing trits count as 0), so a byte is in 0..242: log₂3 ≈ 1.585 bits/trit
  ideal, 8/5 = 1.6 bits/trit here.                                           ceil(n/5) bytes
* ``pack_kbit``  — k bits/value, k in 1..8: a little-endian bit stream; value i occupies stream
  bits [i·k, i·k+k) (its least significant bit first), and stream bit b lives in byte b//8 at
  bit b%8. k = 1, 2, 4, 8 coincide with the fixed-width formats above (k = 8 is the identity);
  other k go through a (n, k) bit expansion and ``pack_bits``.                 ceil(n·k/8) bytes

Inputs out of range (a code ≥ 2^k, a trit > 2) are masked to their low k bits by the bit
packers and are undefined for ``pack_base3``; callers produce codes in range. The code is plain
tensor arithmetic with shapes fixed by n (no loops over elements, no ``.item()``), so it can be
traced by ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "base3_nbytes",
    "pack_2bit",
    "pack_base3",
    "pack_bits",
    "pack_kbit",
    "packed_nbytes",
    "unpack_2bit",
    "unpack_base3",
    "unpack_bits",
    "unpack_kbit",
]

_POW3 = (1, 3, 9, 27, 81)


def packed_nbytes(n: int, bits_per_value: int) -> int:
    """Bytes of n values packed at an integer ``bits_per_value`` (1..8): ceil(n·bits/8)."""
    return (n * bits_per_value + 7) // 8


def base3_nbytes(n: int) -> int:
    """Bytes of n trits packed five to a byte: ceil(n/5)."""
    return (n + 4) // 5


def _codes(t: Tensor, what: str) -> Tensor:
    if t.dim() != 1:
        raise ValueError(f"{what}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    return t if t.dtype == torch.uint8 else t.to(torch.uint8)


def _buffer(buf: Tensor, nbytes: int, what: str) -> Tensor:
    if buf.dim() != 1 or buf.dtype != torch.uint8:
        raise ValueError(f"{what}: expected a 1-D uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
    if buf.numel() < nbytes:
        raise ValueError(f"{what}: buffer holds {buf.numel()} bytes, {nbytes} needed")
    return buf[:nbytes]


def _pack_fields(codes: Tensor, width: int) -> Tensor:
    """Pack ``8 // width`` fields of ``width`` bits per byte, field f at bits [f·width, …)."""
    per = 8 // width
    n = codes.numel()
    nbytes = (n + per - 1) // per
    c = F.pad(codes & ((1 << width) - 1), (0, nbytes * per - n)).view(nbytes, per)
    # OR of the shifted columns, written out: a pointwise expression that torch.compile fuses
    # into one loop (a multiply-sum reduction over the 8/width columns compiles ~3x slower)
    out = c[:, 0]
    for f in range(1, per):
        out = out | (c[:, f] << (f * width))
    return out


def _unpack_fields(buf: Tensor, width: int, n: int) -> Tensor:
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=buf.device)
    return ((buf[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)[:n]


def pack_bits(bits: Tensor) -> Tensor:
    """0/1 values (n,) → uint8 (ceil(n/8),); value i is bit i%8 of byte i//8."""
    return _pack_fields(_codes(bits, "pack_bits"), 1)


def unpack_bits(buf: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first n bits of ``buf`` as uint8 0/1 (n,)."""
    return _unpack_fields(_buffer(buf, packed_nbytes(n, 1), "unpack_bits"), 1, n)


def pack_2bit(codes: Tensor) -> Tensor:
    """Codes in 0..3 (n,) → uint8 (ceil(n/4),); value i is bits 2·(i%4)…+1 of byte i//4."""
    return _pack_fields(_codes(codes, "pack_2bit"), 2)


def unpack_2bit(buf: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_2bit`: n codes in 0..3 as uint8 (n,)."""
    return _unpack_fields(_buffer(buf, packed_nbytes(n, 2), "unpack_2bit"), 2, n)


def pack_base3(trits: Tensor) -> Tensor:
    """Trits in 0..2 (n,) → uint8 (ceil(n/5),); byte j = Σ_{m<5} 3^m · trit[5j+m]."""
    t = _codes(trits, "pack_base3")
    n = t.numel()
    nbytes = base3_nbytes(n)
    w = torch.tensor(_POW3, dtype=torch.uint8, device=t.device)
    return (F.pad(t, (0, nbytes * 5 - n)).view(nbytes, 5) * w).sum(dim=1, dtype=torch.uint8)


def unpack_base3(buf: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_base3`: trit m of byte j is (byte // 3^m) mod 3."""
    b = _buffer(buf, base3_nbytes(n), "unpack_base3")
    w = torch.tensor(_POW3, dtype=torch.uint8, device=b.device)
    return torch.remainder(torch.div(b[:, None], w, rounding_mode="floor"), 3).reshape(-1)[:n]


def _check_k(k: int) -> None:
    if not (isinstance(k, int) and 1 <= k <= 8):
        raise ValueError(f"k must be an int in 1..8, got {k!r}")


def pack_kbit(codes: Tensor, k: int) -> Tensor:
    """Codes in 0..2^k−1 (n,) → uint8 (ceil(n·k/8),) as a little-endian bit stream."""
    _check_k(k)
    c = _codes(codes, "pack_kbit")
    if k == 8:
        return c.clone()
    if k in (1, 2, 4):
        return _pack_fields(c, k)
    shifts = torch.arange(k, dtype=torch.uint8, device=c.device)
    return _pack_fields(((c[:, None] >> shifts) & 1).reshape(-1), 1)


def unpack_kbit(buf: Tensor, k: int, n: int) -> Tensor:
    """Inverse of :func:`pack_kbit`: n codes of k bits as uint8 (n,)."""
    _check_k(k)
    b = _buffer(buf, packed_nbytes(n, k), "unpack_kbit")
    if k == 8:
        return b.clone()
    if k in (1, 2, 4):
        return _unpack_fields(b, k, n)
    bits = _unpack_fields(b, 1, n * k).view(n, k)
    shifts = torch.arange(k, dtype=torch.uint8, device=b.device)
    return (bits << shifts).sum(dim=1, dtype=torch.uint8)

"""Block quantization for the wire: the exact maths of every gradient compressor, its pure-torch
reference, and the dispatch to the fused kernels (C on CPU, Triton on CUDA).

**Blocks and the table.** Data is cut into *blocks* of at most ``spec.block`` values; the
caller (``dqt.comm.layout``) makes blocks that never cross a parameter tensor. A block table is
an int64 tensor (nblocks, 8), one row per block::

    DATA  first value in the data tensor (input of encode, output of decode)
    RES   first value in the residual buffer (error feedback; ignored without one)
    LEN   number of values, 1 ≤ LEN ≤ block
    MSG   byte offset of the message the block belongs to
    SCALE byte offset of the block's scale, relative to MSG
    CODE  byte offset of the block's codes, relative to MSG
    CTR   the block's Philox counter (its index in the bucket)

**The message of a block** is its scale (``scale`` = fp32: 4 bytes little-endian; bf16: 2
bytes, rounded to nearest even; e8m0: 1 byte, a power of two — see below; none) and its codes
packed on their own, starting at a byte:
``code_bits`` = k ∈ 1..8 is a little-endian bit stream (value j at bits [jk, jk+k), bit b in
byte b//8 at b%8), ceil(LEN·k/8) bytes; ``code_bits = 0`` is base-3, byte b = Σ_{m<5} 3^m·code[5b+m],
ceil(LEN/5) bytes. Padding bits and trits are 0.

**Per block**, with v the block's values (x, plus S·e with error feedback, S the loss scale):

* ``sign_mean`` (1-bit SGD, Seide et al. 2014; EF-SignSGD, Karimireddy et al. 2019):
  a = fp32(Σ|vᵢ| / LEN) (sum in fp64), the L2-optimal scale of a·sign(v); code = [vᵢ ≥ 0];
  decode ±a.
* ``sign`` (signSGD, Bernstein et al. 2018): no scale; code = [vᵢ ≥ 0]; decode ±1.
* ``ternary`` (TernGrad, Wen et al. 2017): optional clipping to ±c·σ (μ = fp32(Σv/LEN),
  σ² = Σ(vᵢ − μ)²/LEN in fp64, bound = fp32(c·σ)); s = max|vᵢ|; keep = (uᵢ·s < |vᵢ|), i.e.
  Bernoulli(|vᵢ|/s); code tᵢ + 1 = keep ? (vᵢ > 0 ? 2 : 0) : 1; decode −s, +0, +s.
  E[decode] = v without clipping (unbiased).
* ``qsgd`` (QSGD, Alistarh et al. 2017), L = ``levels``: ν = fp32(√Σvᵢ²) (fp64);
  ℓᵢ = (|vᵢ|·r)·L with r = fp32(1/ν) (0 when ν = 0 or 1/ν overflows); levelᵢ = ⌊ℓᵢ⌋ +
  [uᵢ < ℓᵢ − ⌊ℓᵢ⌋], clamped to [0, L]; code = 2·level + [vᵢ < 0]; decode ±level·fp32(ν/L).
  E[level] = ℓ, so unbiased (up to the rounding of r).

**e8m0 scales** (the shared-exponent scale of the OCP Microscaling formats): byte e encodes
2^(e − 127) for 1 ≤ e ≤ 254, 0 for e = 0 (here exactly zero) and NaN for 255. A statistic
a = m·2^E (1 ≤ m < 2) is rounded to the nearest power of two in the log domain — e = E + 127
+ [m ≥ √2], i.e. fp32 mantissa bits ≥ 3474676 — with integer operations only; subnormal a
becomes 0 and e is capped at 254. One byte per block lets blocks be small (1-bit SGD: 128
values at 1.0625 bits per value) — what matters for accuracy — at the price of a coarser scale,
whose error the error feedback absorbs.

u is the Philox uniform of :mod:`dqt.kernels.philox` for (key, CTR, value index). The scale
used for coding and for the local decode is the *transmitted* (rounded) one, so the sender's
error feedback e' = (v − decode)·fp32(1/S) matches what every receiver decodes.

**Non-finite blocks.** A block holding inf/NaN (or whose rounded scale is not finite) is sent
as scale NaN and all-zero codes, decodes to NaN everywhere, and leaves its residual untouched;
``bad[k]`` reports it (``sign`` has no scale, so callers carry a flag byte).

**Decode** reads, for each block, ``npeers`` messages ``peer_stride`` bytes apart, sums their
decodes in peer order (d₀ + d₁ + …, fp32), then ``mode``: ``copy``, ``mean`` (× fp32(1/npeers):
one reciprocal per call, like the per-block reciprocals above, instead of a division per value)
or ``vote`` (sign of the sum, majority vote; NaN stays NaN); a message whose byte at
``flag_off`` (≥ 0) is non-zero decodes to NaN. The result lands at DATA.

Every implementation — this reference, the C kernel, the Triton kernel — performs the same
IEEE operations in the same order, except the fp64 block sums, whose order differs; an fp64
sum of fp32 values rounds back to the same fp32 scale except with probability ~2⁻²⁹ per block.
Tests compare the bytes of all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dqt.kernels import bitpack
from dqt.kernels.philox import uniforms

__all__ = ["BlockSpec", "COLUMNS", "KINDS", "Impl", "available_impls", "decode", "encode",
           "linear_table", "table_from_rows"]

KINDS = ("sign_mean", "sign", "ternary", "qsgd")
SCALES = {"none": 0, "fp32": 4, "bf16": 2, "e8m0": 1}  # scale format -> bytes per block
E8M0_ROUND_UP = 3474676  # fp32 mantissa bits of √2 (rounded up): m >= √2 rounds 2^E up
DATA, RES, LEN, MSG, SCALE, CODE, CTR = range(7)
COLUMNS = 8  # the 8th column is reserved (0)
Impl = Literal["auto", "reference", "c", "triton"]


@dataclass(frozen=True)
class BlockSpec:
    """What a block carries: ``kind`` (KINDS), at most ``block`` values (a multiple of 8),
    ``code_bits`` per value (1..8; 0 = base-3, 5 per byte), ``scale`` none/fp32/bf16,
    ``levels`` (qsgd L) and ``clip`` (ternary c, 0 = off)."""

    kind: str
    block: int
    code_bits: int
    scale: str = "fp32"
    levels: int = 0
    clip: float = 0.0

    def __post_init__(self) -> None:
        # every implementation sees the same clip: the fp32 value (exact in fp64 and Triton)
        object.__setattr__(self, "clip", float(torch.tensor(float(self.clip), dtype=torch.float32)))
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {self.kind!r}")
        if not (isinstance(self.block, int) and self.block >= 8 and self.block % 8 == 0):
            raise ValueError(f"block must be a positive multiple of 8; got {self.block!r}")
        if not 0 <= self.code_bits <= 8:
            raise ValueError(f"code_bits must be in 0..8; got {self.code_bits!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {self.scale!r}")
        if (self.kind == "sign") != (self.scale == "none"):
            raise ValueError("kind 'sign' and only it has scale 'none'")
        if self.kind == "qsgd" and not (1 <= self.levels and 2 * self.levels < 1 << self.code_bits):
            raise ValueError(f"qsgd needs 1 <= levels and 2*levels < 2^code_bits; got "
                             f"levels={self.levels}, code_bits={self.code_bits}")

    @property
    def stochastic(self) -> bool:
        return self.kind in ("ternary", "qsgd")

    @property
    def scale_nbytes(self) -> int:
        return SCALES[self.scale]

    def code_nbytes(self, n: int) -> int:
        return (n + 4) // 5 if self.code_bits == 0 else (n * self.code_bits + 7) // 8

    def message_nbytes(self, lengths: list[int]) -> int:
        """Bytes of a message holding blocks of these lengths: scales first, then codes."""
        return self.scale_nbytes * len(lengths) + sum(self.code_nbytes(n) for n in lengths)


def table_from_rows(rows: list[tuple[int, ...]], device: torch.device | str = "cpu") -> Tensor:
    """(DATA, RES, LEN, MSG, SCALE, CODE, CTR) tuples → the int64 (nblocks, 8) table."""
    t = torch.zeros(len(rows), COLUMNS, dtype=torch.int64)
    if rows:
        t[:, :7] = torch.tensor(rows, dtype=torch.int64)
    return t.to(device)


def linear_table(spec: BlockSpec, n: int, device: torch.device | str = "cpu"
                 ) -> tuple[Tensor, int]:
    """The table of one 1-D tensor of n values as one message: blocks of ``spec.block`` (the
    last partial), residual offsets = data offsets, counters 0, 1, ...; returns (table, bytes)."""
    lengths = [min(spec.block, n - s) for s in range(0, n, spec.block)]
    code, rows = spec.scale_nbytes * len(lengths), []
    for k, (start, ln) in enumerate(zip(range(0, n, spec.block), lengths)):
        rows.append((start, start, ln, 0, k * spec.scale_nbytes, code, k))
        code += spec.code_nbytes(ln)
    return table_from_rows(rows, device), code


# ================================================================== the pure-torch reference
def f32_recip(x: float) -> float:
    """fp32(1/x), the IEEE fp32 quotient (what every implementation multiplies by)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(x, dtype=torch.float32))


def _div(a: Tensor, b: Tensor | float) -> Tensor:
    """a / b as an IEEE division of two tensors (CUDA turns ``tensor / scalar`` into a multiply
    by the reciprocal, which rounds differently)."""
    return a / (b if isinstance(b, Tensor) else torch.full_like(a, b))


def _padded_width(spec: BlockSpec) -> int:
    return -(-spec.block // 40) * 40  # a multiple of 8 (bit codes) and 5 (base-3) and 4


def _bf16_bits(s: Tensor) -> Tensor:
    """fp32 → bf16 bit patterns (int64), round to nearest even; NaN → 0x7FC0."""
    b = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(s), 0x7FC0, r)


def _e8m0_code(s: Tensor) -> Tensor:
    """Non-negative fp32 → e8m0 byte (int64): nearest power of two in the log domain."""
    b = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    exp, man = (b >> 23) & 0xFF, b & 0x7FFFFF
    e = torch.clamp(exp + (man >= E8M0_ROUND_UP).to(torch.int64), max=254)
    e = torch.where(exp == 0, 0, e)
    return torch.where(torch.isfinite(s), e, 255)


def _e8m0_value(e: Tensor) -> Tensor:
    v = (e.to(torch.int64) << 23).to(torch.int32).view(torch.float32)
    return torch.where(e == 0, 0.0, torch.where(e == 255, float("nan"), v))


def _scale_to_bytes(spec: BlockSpec, s: Tensor) -> tuple[Tensor, Tensor]:
    """(transmitted scale as fp32, its little-endian bytes (K, scale_nbytes))."""
    if spec.scale == "bf16":
        bits = _bf16_bits(s)
        sent = (bits << 16).to(torch.int32).view(torch.float32)
    elif spec.scale == "e8m0":
        bits = _e8m0_code(s)
        sent = _e8m0_value(bits)
    else:
        bits = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        sent = s
    shifts = torch.arange(spec.scale_nbytes, dtype=torch.int64, device=s.device) * 8
    return sent, ((bits[:, None] >> shifts) & 0xFF).to(torch.uint8)


def _scale_from_bytes(spec: BlockSpec, b: Tensor) -> Tensor:
    """(K, scale_nbytes) uint8 → fp32 scales."""
    shifts = torch.arange(spec.scale_nbytes, dtype=torch.int64, device=b.device) * 8
    bits = (b.to(torch.int64) << shifts).sum(1)
    if spec.scale == "e8m0":
        return _e8m0_value(bits)
    if spec.scale == "bf16":
        bits = bits << 16
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def _block_view(t: Tensor, start: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Gather t[start_k + j] into (K, W), zero where ~mask; also the flat indices."""
    j = torch.arange(mask.shape[1], device=t.device)
    idx = start[:, None] + j[None, :]
    safe = torch.where(mask, idx, 0)
    vals = t[safe] if t.numel() else torch.zeros(mask.shape, dtype=t.dtype, device=t.device)
    return torch.where(mask, vals.to(torch.float32), 0.0), idx


def _stats(spec: BlockSpec, v: Tensor, mask: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Block values (K, W) → (untransmitted scale (K,), the values to code (K, W)): mean|v|,
    1, max|clip(v)| or ‖v‖₂ (fp64 sums rounded once to fp32)."""
    nf = n.to(torch.float64)
    if spec.kind == "sign":
        return torch.ones(v.shape[0], dtype=torch.float32, device=v.device), v
    if spec.kind == "sign_mean":
        return (v.abs().to(torch.float64).sum(1) / nf).to(torch.float32), v
    if spec.kind == "ternary":
        if spec.clip > 0:
            mean = (v.to(torch.float64).sum(1) / nf).to(torch.float32)
            dev = torch.where(mask, v - mean[:, None], 0.0).to(torch.float64)
            bound = (spec.clip * torch.sqrt((dev * dev).sum(1) / nf)).to(torch.float32)
            v = torch.minimum(torch.maximum(v, -bound[:, None]), bound[:, None])
        return v.abs().amax(1), v
    v64 = v.to(torch.float64)
    return torch.sqrt((v64 * v64).sum(1)).to(torch.float32), v


def encode_ref(spec: BlockSpec, x: Tensor, table: Tensor, msg: Tensor,
               residual: Tensor | None = None, grad_scale: float = 1.0, key: int = 0,
               bad: Tensor | None = None) -> None:
    """Encode every block of ``table`` into ``msg`` (uint8, written in place); with a
    ``residual``, error feedback v = x + S·e and e ← (v − decode)/S for finite blocks."""
    K = table.shape[0]
    if K == 0:
        return
    W = _padded_width(spec)
    n = table[:, LEN]
    mask = torch.arange(W, device=x.device)[None, :] < n[:, None]
    v, _ = _block_view(x, table[:, DATA], mask)
    if residual is not None:
        e, ridx = _block_view(residual, table[:, RES], mask)
        v = v + (e if grad_scale == 1.0 else e * torch.tensor(grad_scale, dtype=torch.float32))
    finite_vals = (torch.isfinite(v) | ~mask).all(1)
    raw, work = _stats(spec, v, mask, n)
    if spec.kind == "sign":
        sent, sbytes = raw, None
    else:
        sent, sbytes = _scale_to_bytes(spec, raw)
    is_bad = ~finite_vals | ~torch.isfinite(sent)
    u = uniforms(key, table[:, CTR], W) if spec.stochastic else None
    s = sent[:, None]
    if spec.kind == "sign_mean":
        code = (v >= 0).to(torch.int64)
        dec = torch.where(code == 1, s, -s)
    elif spec.kind == "sign":
        code = (v >= 0).to(torch.int64)
        dec = torch.where(code == 1, 1.0, -1.0)
    elif spec.kind == "ternary":
        keep = (u * s) < work.abs()
        code = torch.where(keep, torch.where(work > 0, 2, 0), 1)
        dec = torch.where(code == 2, s, torch.where(code == 0, -s, 0.0))
    else:  # qsgd
        L = spec.levels
        r = torch.where(s > 0, _div(torch.ones_like(s), torch.where(s > 0, s, 1.0)), 0.0)
        r = torch.where(torch.isfinite(r), r, 0.0)
        ell = (work.abs() * r) * float(L)
        lo = torch.floor(ell)
        level = lo + (u < ell - lo).to(torch.float32)
        level = torch.nan_to_num(level, nan=0.0).clamp(0, L)
        neg = work < 0
        code = level.to(torch.int64) * 2 + neg.to(torch.int64)
        mag = level * _div(s, float(L))
        dec = torch.where(neg, -mag, mag)
    code = torch.where(is_bad[:, None] | ~mask, 0, code)
    if residual is not None:
        new = v - dec
        if grad_scale != 1.0:
            new = new * f32_recip(grad_scale)
        upd = mask & ~is_bad[:, None]
        residual[ridx[upd]] = new[upd]
    base = table[:, MSG]
    if sbytes is not None:
        nan_bytes = _scale_to_bytes(spec, torch.full((K,), float("nan"), device=x.device))[1]
        sbytes = torch.where(is_bad[:, None], nan_bytes, sbytes)
        pos = (base + table[:, SCALE])[:, None] + torch.arange(sbytes.shape[1], device=x.device)
        msg[pos.reshape(-1)] = sbytes.reshape(-1)
    if spec.code_bits == 0:
        packed = bitpack.pack_base3(code.reshape(-1).to(torch.uint8)).view(K, W // 5)
    else:
        packed = bitpack.pack_kbit(code.reshape(-1).to(torch.uint8), spec.code_bits).view(K, -1)
    nbytes = (n + 4) // 5 if spec.code_bits == 0 else (n * spec.code_bits + 7) // 8
    cols = torch.arange(packed.shape[1], device=x.device)[None, :]
    valid = cols < nbytes[:, None]
    pos = (base + table[:, CODE])[:, None] + cols
    msg[pos[valid]] = packed[valid]
    if bad is not None:
        bad.copy_(is_bad.to(bad.dtype))


def decode_ref(spec: BlockSpec, msg: Tensor, table: Tensor, out: Tensor, npeers: int = 1,
               peer_stride: int = 0, flag_off: int = -1, mode: str = "copy") -> None:
    """Decode every block of ``table`` from ``npeers`` messages, reduce, write ``out``."""
    K = table.shape[0]
    if K == 0:
        return
    W = _padded_width(spec)
    n = table[:, LEN]
    dev = msg.device
    mask = torch.arange(W, device=dev)[None, :] < n[:, None]
    total = None
    for p in range(npeers):
        base = table[:, MSG] + p * peer_stride
        if spec.kind == "sign":
            s = torch.ones(K, 1, device=dev)
        else:
            pos = (base + table[:, SCALE])[:, None] + torch.arange(spec.scale_nbytes, device=dev)
            s = _scale_from_bytes(spec, msg[pos])[:, None]
        nb = W // 5 if spec.code_bits == 0 else W * spec.code_bits // 8
        cols = torch.arange(nb, device=dev)[None, :]
        nbytes = (n + 4) // 5 if spec.code_bits == 0 else (n * spec.code_bits + 7) // 8
        pos = (base + table[:, CODE])[:, None] + cols
        raw = torch.where(cols < nbytes[:, None], msg[torch.where(cols < nbytes[:, None], pos, 0)],
                          0).to(torch.uint8).reshape(-1)
        if spec.code_bits == 0:
            code = bitpack.unpack_base3(raw, K * W).view(K, W).to(torch.int64)
        else:
            code = bitpack.unpack_kbit(raw, spec.code_bits, K * W).view(K, W).to(torch.int64)
        if spec.kind in ("sign_mean", "sign"):
            d = torch.where(code == 1, s, -s)
        elif spec.kind == "ternary":
            d = torch.where(code == 2, s, torch.where(code == 0, -s, 0.0))
        else:
            mag = (code >> 1).to(torch.float32) * _div(s, float(spec.levels))
            d = torch.where((code & 1) == 1, -mag, mag)
        if flag_off >= 0:
            flagged = msg[base + flag_off] != 0
            d = torch.where(flagged[:, None], float("nan"), d)
        total = d if total is None else total + d
    if mode == "mean":
        total = total * f32_recip(npeers)
    elif mode == "vote":
        total = torch.where(torch.isnan(total), total, torch.where(total >= 0, 1.0, -1.0))
    elif mode != "copy":
        raise ValueError(f"mode must be copy, mean or vote; got {mode!r}")
    idx = table[:, DATA][:, None] + torch.arange(W, device=dev)[None, :]
    out[idx[mask]] = total[mask].to(out.dtype)


# ================================================================== dispatch
def available_impls(device: torch.device | str) -> list[str]:
    """Implementations usable for tensors on ``device``, fastest first."""
    dev = torch.device(device)
    out = []
    if dev.type == "cuda":
        from dqt.kernels import blockq_triton

        if blockq_triton.available():
            out.append("triton")
    elif dev.type == "cpu":
        from dqt.kernels import blockq_c

        if blockq_c.available():
            out.append("c")
        from dqt.kernels import blockq_triton

        if blockq_triton.interpreting():
            out.append("triton")
    out.append("reference")
    return out


def _resolve(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return available_impls(device)[0]
    if impl not in ("reference", "c", "triton"):
        raise ValueError(f"impl must be auto, reference, c or triton; got {impl!r}")
    if impl not in available_impls(device):
        raise RuntimeError(f"kernel implementation {impl!r} is not available for "
                           f"{device.type} tensors here; available: {available_impls(device)}")
    return impl


def _check(x: Tensor, table: Tensor, msg: Tensor) -> None:
    if table.dim() != 2 or table.shape[1] != COLUMNS or table.dtype != torch.int64:
        raise ValueError(f"table must be int64 (nblocks, {COLUMNS}); got {table.dtype} "
                         f"{tuple(table.shape)}")
    if msg.dtype != torch.uint8 or msg.dim() != 1:
        raise ValueError(f"messages must be a 1-D uint8 tensor; got {msg.dtype} {tuple(msg.shape)}")
    if not (x.is_contiguous() and msg.is_contiguous() and table.is_contiguous()):
        raise ValueError("tensors must be contiguous")
    if not (x.device == table.device == msg.device):
        raise ValueError(f"tensors on different devices: {x.device}, {table.device}, {msg.device}")


def _implementation(which: str):
    """The module of implementation ``which`` (imported on first use)."""
    if which == "c":
        from dqt.kernels import blockq_c

        return blockq_c
    from dqt.kernels import blockq_triton

    return blockq_triton


def encode(spec: BlockSpec, x: Tensor, table: Tensor, msg: Tensor,
           residual: Tensor | None = None, grad_scale: float = 1.0, key: int = 0,
           bad: Tensor | None = None, impl: Impl = "auto") -> None:
    """Encode the blocks of ``table`` from fp32 ``x`` into ``msg`` (see the module docstring).
    ``residual`` (fp32, updated in place) turns on error feedback with loss scale
    ``grad_scale``; ``key`` seeds the Philox stream of stochastic kinds; ``bad`` (int32
    (nblocks,)) receives the non-finite flags."""
    if x.dtype != torch.float32:
        raise ValueError(f"encode takes fp32 data; got {x.dtype}")
    _check(x, table, msg)
    which = _resolve(impl, x.device)
    run = encode_ref if which == "reference" else _implementation(which).encode
    run(spec, x, table, msg, residual, grad_scale, key, bad)


def decode(spec: BlockSpec, msg: Tensor, table: Tensor, out: Tensor, npeers: int = 1,
           peer_stride: int = 0, flag_off: int = -1, mode: str = "copy",
           impl: Impl = "auto") -> None:
    """Decode the blocks of ``table`` from ``npeers`` messages into fp32 ``out``."""
    if out.dtype != torch.float32:
        raise ValueError(f"decode writes fp32; got {out.dtype}")
    if mode not in ("copy", "mean", "vote"):
        raise ValueError(f"mode must be copy, mean or vote; got {mode!r}")
    _check(out, table, msg)
    which = _resolve(impl, out.device)
    run = decode_ref if which == "reference" else _implementation(which).decode
    run(spec, msg, table, out, npeers, peer_stride, flag_off, mode)

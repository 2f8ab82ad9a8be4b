"""The pure-torch reference of the wire format (:mod:`dqt.kernels.blockq.format`): encode and
decode-and-reduce of every block kind, vectorized over the blocks of a table. The C and Triton
kernels are checked byte for byte against it."""

from __future__ import annotations

import torch
from torch import Tensor

from dqt.kernels import bitpack
from dqt.kernels.blockq.format import (BF16_NAN, CODE, CTR, DATA, E8M0_MAX, E8M0_NAN,
                                        E8M0_ROUND_UP, FP8_DTYPES, FP8_EXP, FP8_MAX, LEN, MSG,
                                        RES, SCALE, SCALES, BlockSpec, f32_recip)
from dqt.kernels.philox import uniforms

__all__ = ["decode_ref", "encode_ref"]


def _div(a: Tensor, b: Tensor | float) -> Tensor:
    """a / b as an IEEE division of two tensors (CUDA turns ``tensor / scalar`` into a multiply
    by the reciprocal, which rounds differently)."""
    return a / (b if isinstance(b, Tensor) else torch.full_like(a, b))


def _padded_width(spec: BlockSpec) -> int:
    return -(-spec.block // 40) * 40  # a multiple of 8 (bit codes) and 5 (base-3) and 4


def _bf16_bits(s: Tensor) -> Tensor:
    """fp32 → bf16 bit patterns (int64), round to nearest even; NaN → BF16_NAN."""
    b = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(s), BF16_NAN, r)


def _e8m0_code(s: Tensor) -> Tensor:
    """Non-negative fp32 → e8m0 byte (int64): nearest power of two in the log domain."""
    b = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    exp, man = (b >> 23) & 0xFF, b & 0x7FFFFF
    e = torch.clamp(exp + (man >= E8M0_ROUND_UP).to(torch.int64), max=E8M0_MAX)
    e = torch.where(exp == 0, 0, e)
    return torch.where(torch.isfinite(s), e, E8M0_NAN)


def _e8m0_value(e: Tensor) -> Tensor:
    v = (e.to(torch.int64) << 23).to(torch.int32).view(torch.float32)
    return torch.where(e == 0, 0.0, torch.where(e == E8M0_NAN, float("nan"), v))


def _scale_to_bytes(spec: BlockSpec, s: Tensor) -> tuple[Tensor, Tensor]:
    """(transmitted scales as fp32, their little-endian bytes (K, bytes of one scale))."""
    if spec.scale == "bf16":
        bits = _bf16_bits(s)
        sent = (bits << 16).to(torch.int32).view(torch.float32)
    elif spec.scale == "e8m0":
        bits = _e8m0_code(s)
        sent = _e8m0_value(bits)
    else:
        bits = s.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        sent = s
    shifts = torch.arange(SCALES[spec.scale], dtype=torch.int64, device=s.device) * 8
    return sent, ((bits[:, None] >> shifts) & 0xFF).to(torch.uint8)


def _scale_from_bytes(spec: BlockSpec, b: Tensor) -> Tensor:
    """(K, bytes of one scale) uint8 → fp32 scales."""
    shifts = torch.arange(SCALES[spec.scale], dtype=torch.int64, device=b.device) * 8
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


def _group_mean_abs(v: Tensor, group: Tensor) -> Tensor:
    """fp32(Σ_group |v| / n_group) per row (fp64 sum), 0 for an empty group."""
    cnt = group.sum(1)
    total = torch.where(group, v.abs(), 0.0).to(torch.float64).sum(1)
    mean = (total / cnt.clamp(min=1).to(torch.float64)).to(torch.float32)
    return torch.where(cnt > 0, mean, 0.0)


def _stats(spec: BlockSpec, v: Tensor, mask: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Block values (K, W) → (untransmitted scale (K,), the values to code (K, W)): mean|v|,
    1, max|clip(v)| or ‖v‖₂ (fp64 sums rounded once to fp32); ``sign_two``: (K, 2), the mean
    magnitudes m₀ of the values < 0 and m₁ of those ≥ 0."""
    nf = n.to(torch.float64)
    if spec.kind == "sign":
        return torch.ones(v.shape[0], dtype=torch.float32, device=v.device), v
    if spec.kind == "sign_mean":
        return (v.abs().to(torch.float64).sum(1) / nf).to(torch.float32), v
    if spec.kind == "sign_two":
        return torch.stack([_group_mean_abs(v, mask & (v < 0)),
                            _group_mean_abs(v, mask & (v >= 0))], 1), v
    if spec.kind == "ternary":
        if spec.clip > 0:
            mean = (v.to(torch.float64).sum(1) / nf).to(torch.float32)
            dev = torch.where(mask, v - mean[:, None], 0.0).to(torch.float64)
            bound = (spec.clip * torch.sqrt((dev * dev).sum(1) / nf)).to(torch.float32)
            v = torch.minimum(torch.maximum(v, -bound[:, None]), bound[:, None])
        return v.abs().amax(1), v
    if spec.kind in FP8_MAX:
        return _fp8_scale(spec, v.abs().amax(1)), v
    v64 = v.to(torch.float64)
    return torch.sqrt((v64 * v64).sum(1)).to(torch.float32), v


def _fp8_scale(spec: BlockSpec, amax: Tensor) -> Tensor:
    """The smallest power of two 2^P, P ≥ −126, with amax ≤ FMAX·2^P (FMAX = 1.75·2^F), from
    amax's bits; amax itself where it is 0 or not finite."""
    b = amax.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    e, man = b >> 23, b & 0x7FFFFF
    p = torch.where(e == 0, -126, e - 127 - FP8_EXP[spec.kind] + (man > 0x600000).to(torch.int64))
    s = ((p.clamp(min=-126) + 127) << 23).to(torch.int32).view(torch.float32)
    return torch.where((amax > 0) & torch.isfinite(amax), s, amax)


def _fp8_value(spec: BlockSpec, code: Tensor) -> Tensor:
    """fp8 bytes (int64) → their fp32 values (torch's exact widening)."""
    return code.to(torch.uint8).view(FP8_DTYPES[spec.kind]).to(torch.float32)


def _fp8_encode(spec: BlockSpec, v: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(fp8 bytes of clamp(v / s, ±FMAX), their decode fp8·s); all 0 where s = 0."""
    fmax = FP8_MAX[spec.kind]
    pos = s > 0
    q = torch.where(pos, _div(v, torch.where(pos, s, 1.0).expand_as(v)), 0.0)
    q = torch.nan_to_num(q.clamp(-fmax, fmax), nan=0.0)  # NaN: a non-finite block, coded 0
    code = q.to(FP8_DTYPES[spec.kind]).view(torch.uint8).to(torch.int64)
    return code, _fp8_value(spec, code) * s


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
    else:  # sign_two: (K, 2) scales (m₀, m₁) → the scale field m₀ then m₁
        sent, sbytes = _scale_to_bytes(spec, raw.reshape(-1))
        sent, sbytes = sent.view(raw.shape), sbytes.view(K, -1)
    is_bad = ~finite_vals | ~torch.isfinite(sent.view(K, -1)).all(1)
    u = uniforms(key, table[:, CTR], W) if spec.stochastic else None
    s = sent.view(K, -1)[:, :1]  # sign_two: m₀
    if spec.kind == "sign_two":
        code = (v >= 0).to(torch.int64)
        dec = torch.where(code == 1, sent[:, 1:2], -s)
    elif spec.kind == "sign_mean":
        code = (v >= 0).to(torch.int64)
        dec = torch.where(code == 1, s, -s)
    elif spec.kind == "sign":
        code = (v >= 0).to(torch.int64)
        dec = torch.where(code == 1, 1.0, -1.0)
    elif spec.kind == "ternary":
        keep = (u * s) < work.abs()
        code = torch.where(keep, torch.where(work > 0, 2, 0), 1)
        dec = torch.where(code == 2, s, torch.where(code == 0, -s, 0.0))
    elif spec.kind in FP8_MAX:
        code, dec = _fp8_encode(spec, v, s)
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
        nan_bytes = nan_bytes.repeat(1, spec.scales_per_block)
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
            pos = (base + table[:, SCALE])[:, None] + torch.arange(SCALES[spec.scale], device=dev)
            s = _scale_from_bytes(spec, msg[pos])[:, None]  # sign_two: m₀
            if spec.kind == "sign_two":
                s1 = _scale_from_bytes(spec, msg[pos + SCALES[spec.scale]])[:, None]
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
        elif spec.kind == "sign_two":
            d = torch.where(code == 1, s1, -s)
        elif spec.kind == "ternary":
            d = torch.where(code == 2, s, torch.where(code == 0, -s, 0.0))
        elif spec.kind in FP8_MAX:
            d = _fp8_value(spec, code) * s
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

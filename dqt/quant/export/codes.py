"""Export formats of quantized weights: integer codes plus the few numbers that decode them.

Every weight quantizer's ``encode(w)`` returns one of these for the weight viewed as (N, K)
(N = output channels / embedding rows, K = everything else, conv weights flattened to
in·kh·kw). ``decode()`` rebuilds the fake-quantized weight **bit for bit**: quantizers compute
their forward value with the same fp32 operations, so an exported model's outputs equal the
fake-quant model's (tested). ``tensors()`` gives what goes into safetensors, ``meta()`` the JSON.

Formats
-------
``affine``   W[n,k] = scale[n]·(code[n,k] − zero[n]), codes in [0, 2^bits), packed along K into
             int32 by ``dqt.kernels.lowbit_pack.pack_weight`` (the packed-GEMM layout) at
             ``storage_bits`` ∈ {1, 2, 4, 8} (bits rounded up: 3 → 4, 5..7 → 8).
             1-bit ±α: code = [w ≥ 0], zero = ½, scale = 2α. Ternary: code = t + 1, zero = 1.
``affine_group`` as ``affine`` with one scale and zero per group of G consecutive codes of a row
             (``group_size`` weights): W[n,k] = scale[n,k//G]·(code[n,k] − zero[n,k//G]).
``ternary2`` TTQ {−W_n, 0, +W_p}: 2-bit codes t + 1 packed as above, W = pos[n] if code = 2,
             −neg[n] if code = 0, else 0 (not affine in one code when W_p ≠ W_n).
``log``      one int8 (int16 if the range needs it) code per weight: 0 → 0, else
             W = sign(code) · base^((|code| − 1 + e_min) · step), e_min one int per tensor
             (power-of-two weights: base 2, step 1; the seed's log-linear: base e, step 2^−sf).
``minifloat`` IEEE-style bit patterns (sign | exponent | mantissa, subnormals, no inf/NaN) in
             int16/int32, ``exp_bits``, ``mant_bits``, bias 2^(exp_bits−1) − 1.
``flex``     Flexpoint: int16 mantissas M and one shared exponent κ per tensor: W = M · 2^κ.
``codebook`` one table of 2^bits values per row and codes indexing it: W[n,k] = table[n,
             code[n,k]], codes packed as ``affine`` (non-uniform levels: AQN's Σ αᵢbᵢ sums, ADMM's
             {0, ±a, ±2a, ±4a}).
``tanh``     the seed's tanh quantizer: codes q ∈ [0, n], n = 2^bits − 1, packed as ``affine``;
             W = atanh(clamp(2q/n − 1, ±(1 − 1/n))).
``pq``       Q-CNN product quantization: the weight viewed as (N, C, P) (P = kernel positions,
             1 for Linear), C zero-padded to M·d; subspace s = (p, m) holds a codebook of K
             sub-codewords of length d (fp32 (S, K, d)) and one index per output row (int16
             (S, N)): W[n, m·d:(m+1)·d, p] = codebook[s, index[s, n]].
``factored`` FFN fixed-point factorization W = X·diag(D)·Yᵀ: X (N, r) and Y (K, r) ternary,
             stored as 2-bit codes t + 1 packed like ``affine``, D fp32 (r,).
``shared_codebook`` weight sharing (Deep Compression): cluster indices packed as ``affine``
             codes at ``storage_bits(bits)`` and one fp32 codebook per layer: W[n,k] = c[code[n,k]]; the
             JSON also gives the size of the Huffman-coded indices (``huffman_bits``).
``shift``    ShiftCNN: ``terms`` B-bit codes per weight (term-major along K, packed as above) and
             one fp32 scale per row: W[n,k] = scale[n] · Σ_t C_t[code[n,t,k]], C_t[0] = 0,
             C_t[j] = 2^(2−t−j), C_t[j + L] = −2^(2−t−j) (t = 1..N, j = 1..L, L = 2^(B−1) − 1).
``dense``    fp32 as is: a weight not (yet) quantized everywhere (INQ before its last stage,
             ``kmeans`` before its clustering step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dqt.kernels.lowbit_pack import BITS, dequantize_weight, pack_weight, unpack_weight
from dqt.quant.export.huffman import huffman_bits


def storage_bits(bits: int) -> int:
    """Smallest packed-GEMM width that holds ``bits``-bit codes."""
    for b in BITS:
        if bits <= b:
            return b
    raise ValueError(f"codes of {bits} bits do not fit the packed layouts {BITS}")


@dataclass
class Affine:
    codes: Tensor  # uint8 (N, K)
    scale: Tensor  # fp32 (N,)
    zero: Tensor  # fp32 (N,)
    bits: int
    format = "affine"

    def decode(self) -> Tensor:
        # the kernels' torch reference: scale[n]·(code − zero[n]) in fp32
        return self.scale[:, None] * (self.codes.float() - self.zero[:, None])

    def tensors(self) -> dict[str, Tensor]:
        sb = storage_bits(self.bits)
        return {"packed": pack_weight(self.codes, sb), "scale": self.scale.float().contiguous(),
                "zero": self.zero.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "storage_bits": storage_bits(self.bits)}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return dequantize_weight(t["packed"], t["scale"], t["zero"], meta["storage_bits"], k)


@dataclass
class AffineGroup:
    codes: Tensor  # uint8 (N, K)
    scale: Tensor  # fp32 (N, K/G)
    zero: Tensor  # fp32 (N, K/G)
    bits: int
    format = "affine_group"

    def decode(self) -> Tensor:
        return _affine_group(self.codes, self.scale, self.zero)

    def tensors(self) -> dict[str, Tensor]:
        return {"packed": pack_weight(self.codes, storage_bits(self.bits)),
                "scale": self.scale.float().contiguous(), "zero": self.zero.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "storage_bits": storage_bits(self.bits),
                "group_size": self.codes.shape[1] // self.scale.shape[1]}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return _affine_group(unpack_weight(t["packed"], meta["storage_bits"], k), t["scale"],
                             t["zero"])


def _affine_group(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    n, k = codes.shape
    c = codes.float().reshape(n, scale.shape[1], -1)
    return (scale.float()[..., None] * (c - zero.float()[..., None])).reshape(n, k)


@dataclass
class Ternary2:
    codes: Tensor  # uint8 (N, K): t + 1
    pos: Tensor  # fp32 (N,)
    neg: Tensor  # fp32 (N,)
    format = "ternary2"

    def decode(self) -> Tensor:
        return _ternary2(self.codes, self.pos, self.neg)

    def tensors(self) -> dict[str, Tensor]:
        return {"packed": pack_weight(self.codes, 2), "pos": self.pos.float().contiguous(),
                "neg": self.neg.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"bits": 2, "storage_bits": 2}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return _ternary2(unpack_weight(t["packed"], 2, k), t["pos"], t["neg"])


def _ternary2(codes: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=codes.device)
    p = torch.where(codes == 2, pos[:, None].float(), zero)
    n = torch.where(codes == 0, neg[:, None].float(), zero)
    return p - n


@dataclass
class Log:
    code: Tensor  # int8 / int16 (N, K): 0 = zero, else sign · (e − e_min + 1)
    e_min: int
    base: float
    step: float
    format = "log"

    def decode(self) -> Tensor:
        return log_decode(self.code, self.e_min, self.base, self.step)

    def tensors(self) -> dict[str, Tensor]:
        return {"code": self.code.contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"e_min": self.e_min, "base": self.base, "step": self.step,
                "bits": 8 * self.code.element_size(), "storage_bits": 8 * self.code.element_size()}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return log_decode(t["code"], meta["e_min"], meta["base"], meta["step"])


def log_value(s: Tensor, e: Tensor, base: float, step: float) -> Tensor:
    """sign · base^(e·step) in fp32 — the one formula the log quantizers and decode share."""
    e = e * step if step != 1.0 else e
    return (torch.exp2(e) if base == 2.0 else torch.exp(e)) * s


def log_decode(code: Tensor, e_min: int, base: float, step: float) -> Tensor:
    c = code.to(torch.int32)
    e = (c.abs() - 1 + e_min).float()
    return log_value(torch.sign(c).float(), e, base, step)


@dataclass
class Minifloat:
    codes: Tensor  # int16 / int32 bit patterns (N, K)
    exp_bits: int
    mant_bits: int
    format = "minifloat"

    def decode(self) -> Tensor:
        return minifloat_decode(self.codes, self.exp_bits, self.mant_bits)

    def tensors(self) -> dict[str, Tensor]:
        return {"codes": self.codes.contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"exp_bits": self.exp_bits, "mant_bits": self.mant_bits,
                "bits": 1 + self.exp_bits + self.mant_bits}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return minifloat_decode(t["codes"], meta["exp_bits"], meta["mant_bits"])


def minifloat_decode(codes: Tensor, exp_bits: int, mant_bits: int) -> Tensor:
    c = codes.to(torch.int64)
    bias = (1 << (exp_bits - 1)) - 1
    mant = (c & ((1 << mant_bits) - 1)).float()
    e = (c >> mant_bits) & ((1 << exp_bits) - 1)
    s = 1.0 - 2.0 * ((c >> (mant_bits + exp_bits)) & 1).float()
    normal = e > 0
    frac = torch.where(normal, 1.0 + mant * 2.0 ** -mant_bits, mant * 2.0 ** -mant_bits)
    ex = torch.where(normal, e - bias, torch.full_like(e, 1 - bias)).float()
    return s * torch.ldexp(frac, ex.to(torch.int32)).float()


@dataclass
class Flex:
    mantissa: Tensor  # int16 (N, K)
    exponent: int
    format = "flex"

    def decode(self) -> Tensor:
        return self.mantissa.float() * (2.0 ** self.exponent)

    def tensors(self) -> dict[str, Tensor]:
        return {"mantissa": self.mantissa.contiguous(),
                "exponent": torch.tensor([self.exponent], dtype=torch.int8)}

    def meta(self) -> dict[str, Any]:
        return {"bits": 16, "exponent_bits": 5}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return t["mantissa"].float() * (2.0 ** int(t["exponent"][0]))


@dataclass
class Tanh:
    codes: Tensor  # uint8 (N, K) in [0, 2^bits − 1]
    bits: int
    format = "tanh"

    def decode(self) -> Tensor:
        return tanh_decode(self.codes, self.bits)

    def tensors(self) -> dict[str, Tensor]:
        return {"packed": pack_weight(self.codes, storage_bits(self.bits))}

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "storage_bits": storage_bits(self.bits)}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return tanh_decode(unpack_weight(t["packed"], meta["storage_bits"], k), meta["bits"])


def tanh_decode(codes: Tensor, bits: int) -> Tensor:
    n = 2.0 ** bits - 1
    v = 2 * (codes.float() / n) - 1
    lim = 1 - 1 / n
    v = v.clamp(-lim, lim)
    return 0.5 * torch.log((1 + v) / (1 - v))


@dataclass
class Codebook:
    codes: Tensor  # uint8 (N, K) in [0, table.shape[1])
    table: Tensor  # fp32 (N, L), L ≤ 2^bits
    bits: int
    format = "codebook"

    def decode(self) -> Tensor:
        return codebook_decode(self.codes, self.table)

    def tensors(self) -> dict[str, Tensor]:
        return {"packed": pack_weight(self.codes, storage_bits(self.bits)),
                "table": self.table.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits, "storage_bits": storage_bits(self.bits)}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return codebook_decode(unpack_weight(t["packed"], meta["storage_bits"], k), t["table"])


def codebook_decode(codes: Tensor, table: Tensor) -> Tensor:
    """table[n, code[n, k]] — the one lookup the codebook quantizers and decode share."""
    return torch.gather(table.float(), 1, codes.long())


@dataclass
class ProductCodes:
    codebook: Tensor  # fp32 (S, K, d)
    index: Tensor  # int16 (S, N)
    channels: int  # C (before padding to M·d)
    positions: int  # P
    format = "pq"

    def decode(self) -> Tensor:
        return pq_decode(self.codebook, self.index, self.channels, self.positions)

    def tensors(self) -> dict[str, Tensor]:
        return {"codebook": self.codebook.float().contiguous(),
                "index": self.index.to(torch.int16).contiguous()}

    def meta(self) -> dict[str, Any]:
        s, k, d = self.codebook.shape
        n = self.index.shape[1]
        bits = s * (n * max(1, (k - 1).bit_length()) + 32 * k * d) / (n * self.channels * self.positions)
        return {"channels": self.channels, "positions": self.positions, "codewords": k,
                "sub_dim": d, "bits": round(bits, 3)}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return pq_decode(t["codebook"], t["index"], meta["channels"], meta["positions"])


def pq_decode(codebook: Tensor, index: Tensor, channels: int, positions: int) -> Tensor:
    """(S, K, d) codebooks + (S, N) indices → the weight as (N, C·P) (the quantizers' forward)."""
    s, _, d = codebook.shape
    n = index.shape[1]
    sub = torch.gather(codebook, 1, index.long()[..., None].expand(s, n, d))  # (S, N, d)
    m = s // positions
    w = sub.reshape(positions, m, n, d).permute(2, 1, 3, 0).reshape(n, m * d, positions)
    return w[:, :channels].reshape(n, channels * positions)


@dataclass
class Factored:
    x: Tensor  # int8 (N, r) in {−1, 0, 1}
    d: Tensor  # fp32 (r,)
    y: Tensor  # int8 (K, r) in {−1, 0, 1}
    format = "factored"

    def decode(self) -> Tensor:
        return factored_decode(self.x, self.d, self.y)

    def tensors(self) -> dict[str, Tensor]:
        return {"x": pack_weight((self.x + 1).to(torch.uint8), 2),
                "y": pack_weight((self.y + 1).to(torch.uint8), 2), "d": self.d.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        (n, r), k = self.x.shape, self.y.shape[0]
        return {"rank": r, "bits": round((2 * r * (n + k) + 32 * r) / (n * k), 3)}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        r = meta["rank"]
        x = unpack_weight(t["x"], 2, r).to(torch.int8) - 1
        y = unpack_weight(t["y"], 2, r).to(torch.int8) - 1
        return factored_decode(x, t["d"], y)


def factored_decode(x: Tensor, d: Tensor, y: Tensor) -> Tensor:
    """X·diag(D)·Yᵀ in fp32 (N, K) — the FFN quantizer's forward and the decoder."""
    return (x.float() * d.float()) @ y.float().t()



@dataclass
class SharedCodebook:
    codes: Tensor  # uint8 (N, K) cluster indices in [0, k)
    centroids: Tensor  # fp32 (k,)
    bits: int
    format = "shared_codebook"

    def decode(self) -> Tensor:
        return self.centroids.float()[self.codes.long()]

    def tensors(self) -> dict[str, Tensor]:
        return {"packed": pack_weight(self.codes, storage_bits(self.bits)),
                "centroids": self.centroids.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        counts = torch.bincount(self.codes.reshape(-1).long(), minlength=self.centroids.numel())
        return {"bits": self.bits, "storage_bits": storage_bits(self.bits),
                "clusters": int(self.centroids.numel()),
                "huffman_bits": huffman_bits(counts.tolist())}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return t["centroids"].float()[unpack_weight(t["packed"], meta["storage_bits"], k).long()]


@dataclass
class Shift:
    codes: Tensor  # uint8 (N, terms, K) in [0, 2^bits − 1)
    scale: Tensor  # fp32 (N,)
    bits: int
    format = "shift"

    def decode(self) -> Tensor:
        return shift_decode(self.codes, self.scale, self.bits)

    def tensors(self) -> dict[str, Tensor]:
        n = self.codes.shape[0]
        return {"packed": pack_weight(self.codes.reshape(n, -1), storage_bits(self.bits)),
                "scale": self.scale.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"bits": self.bits * self.codes.shape[1], "code_bits": self.bits,
                "terms": int(self.codes.shape[1]),
                "storage_bits": storage_bits(self.bits) * self.codes.shape[1]}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        n, terms = t["scale"].shape[0], meta["terms"]
        sb = meta["storage_bits"] // terms
        codes = unpack_weight(t["packed"], sb, terms * k).reshape(n, terms, k)
        return shift_decode(codes, t["scale"], meta["code_bits"])


def shift_value(codes: Tensor, term: int, bits: int) -> Tensor:
    """C_t[code] in fp32 (exact powers of two) for term t = 1..N (see the ``shift`` format)."""
    half = 2 ** (bits - 1) - 1
    c = codes.to(torch.int32)
    j = torch.where(c > half, c - half, c)
    mag = torch.exp2((2 - term - j).float())
    return torch.where(c == 0, torch.zeros_like(mag), torch.where(c > half, -mag, mag))


def shift_sum(codes: Tensor, bits: int) -> Tensor:
    """Σ_t C_t[codes[..., t, :]] over dim −2 (codes (..., terms, K)), summed in term order."""
    out = shift_value(codes.select(-2, 0), 1, bits)
    for t in range(1, codes.shape[-2]):
        out = out + shift_value(codes.select(-2, t), t + 1, bits)
    return out


def shift_decode(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    return shift_sum(codes, bits) * scale.float()[:, None]


@dataclass
class Dense:
    weight: Tensor  # fp32 (N, K)
    format = "dense"

    def decode(self) -> Tensor:
        return self.weight.float()

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight.float().contiguous()}

    def meta(self) -> dict[str, Any]:
        return {"bits": 32, "storage_bits": 32}

    @staticmethod
    def load(t: dict[str, Tensor], meta: dict[str, Any], k: int) -> Tensor:
        return t["weight"].float()


FORMATS = {c.format: c for c in (Affine, AffineGroup, Ternary2, Log, Minifloat, Flex, Tanh,
                                 Codebook, ProductCodes, Factored, SharedCodebook, Shift, Dense)}

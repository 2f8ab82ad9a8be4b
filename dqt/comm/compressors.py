"""Gradient compressors with an exact wire format.

A compressor turns a chunk of n fp32 values into one self-contained uint8 message and back::

    message = [scales: nblocks × fp32, little-endian raw bytes][packed codes (dqt.comm.wire)]

The chunk is cut into blocks of ``block_size`` consecutive values, nblocks = ceil(n/block_size)
(``block_size = 0``: one block for the whole chunk; n = 0: no blocks, an empty message). The last
block may be partial; its statistics use only its real elements. ``wire_nbytes(n)`` is the exact
message length, so a collective can size its buffers before encoding.

Schemes (``COMPRESSORS``, selected by ``scheme.name``), per block with values x₁…x_d:

* ``onebit`` — 1-bit SGD (Seide, Fu, Droppo, Li, Yu, Interspeech 2014). Scale a = Σ|xᵢ|/d,
  the L2-optimal single scale for sign (argmin_a ‖x − a·sign x‖² = ‖x‖₁/d; the paper
  reconstructs with two per-column means, one for each sign — one scale keeps the message at
  1 bit + 32/block_size bits per value). Code bit b = 1 if x ≥ 0 else 0; decode a·(2b − 1).
  Biased: pair with error feedback. Blocks of 2048.
* ``ef_signsgd`` — EF-SignSGD (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019): the same
  message as ``onebit`` with the paper's scale ‖x‖₁/d over the whole chunk (block_size 0).
* ``signsgd`` — signSGD (Bernstein, Wang, Azizzadenesheli, Anandkumar, ICML 2018): no scales,
  bit = x ≥ 0, decode ±1. Majority vote is the collective's job: sign of the sum of the
  decoded ±1. A scale-free 1-bit code cannot carry inf/nan: a NaN encodes as −1.
* ``ternary_grad`` — TernGrad (Wen, Xu, Yan, Wu, Wang, Chen, Li, NeurIPS 2017). Optional
  clipping first (``clip_sigma`` c > 0): x ← clamp(x, −cσ, cσ), σ the block's population
  standard deviation (the paper uses c = 2.5). Scale s = max|xᵢ|; bᵢ ~ Bernoulli(|xᵢ|/s);
  tᵢ = sign(xᵢ)·bᵢ ∈ {−1, 0, 1}; code tᵢ + 1 ∈ {0, 1, 2}, packed ``format="2bit"`` (4 per
  byte) or ``"base3"`` (5 per byte, 1.6 bits). Decode s·(code − 1); s = 0 decodes to zeros.
  E[decode] = s·sign(x)·|x|/s = x: unbiased when clipping is off. Blocks of 2048.
* ``qsgd`` — QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017) with k = ``bits``
  in 2..8: L = 2^(k−1) − 1 levels; ν = ‖x‖₂; ℓᵢ = |xᵢ|/ν · L; levelᵢ = ⌊ℓᵢ⌋ +
  Bernoulli(ℓᵢ − ⌊ℓᵢ⌋) ∈ 0..L; code = 2·level + (1 if x < 0 else 0), packed k bits per value
  (``wire.pack_kbit``); decode ν·(±1)·level/L. E[level] = ℓ, so unbiased. Blocks of 2048.

Stochastic rounding (ternary_grad, qsgd) uses one draw of n uniforms in element order,
``torch.rand(n, generator=torch.Generator(device=x.device).manual_seed(seed))``: Bernoulli(p)
is ``u < p``. A message is therefore a pure function of (x, seed); ``encode(x, seed, rand=u)``
takes the uniforms instead (what a ``torch.compile``d caller does, since a generator breaks a
graph). The math is plain tensor ops with shapes fixed by n — no loops over elements, no
``.item()``, no branches on tensor values.

Non-finite input is not sanitized: a block holding inf/nan gets a non-finite scale (sum, max
and norm propagate it), so every value decoded from that block is non-finite and an overflow
check downstream sees it. (``signsgd`` has no scale; see above.)

``mix_seed`` derives per-(seed, step, rank, bucket, …) seeds with SplitMix64 (Steele, Lea,
Flood, "Fast Splittable Pseudorandom Number Generators", OOPSLA 2014; constants as in
Vigna's ``splitmix64.c``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dqt.comm import wire
from dqt.registry import Registry

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "EFSignSGD",
    "OneBit",
    "QSGD",
    "SignSGD",
    "TernaryGrad",
    "build_compressor",
    "mix_seed",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """One SplitMix64 output for state z: z += φ·2⁶⁴, then the two xor-shift-multiply rounds."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from integers such as (seed, step, rank, bucket, phase), order-sensitive.

    h₀ = 0; hᵢ = splitmix64(hᵢ₋₁ xor (vᵢ mod 2⁶⁴)); result hₘ >> 1 (fits ``manual_seed`` and a
    signed int64). ``mix_seed(0)`` is SplitMix64's first output from state 0 (0xE220A8397B1DCDAF)
    shifted right by one. Negative integers are taken mod 2⁶⁴.
    """
    if not ints:
        raise ValueError("mix_seed needs at least one integer")
    h = 0
    for v in ints:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def _scales_to_bytes(scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Scales as little-endian bytes of ``dtype`` (fp32: 4 bytes each; bf16: 2)."""
    width = torch.finfo(dtype).bits // 8
    b = scales.to(dtype).contiguous().view(torch.uint8)
    if sys.byteorder != "little":
        b = b.view(-1, width).flip(1).reshape(-1)
    return b


def _bytes_to_scales(b: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`_scales_to_bytes`, returned as fp32."""
    # A copy: a float view needs aligned storage, and a message sliced out of a receive
    # buffer may start anywhere.
    width = torch.finfo(dtype).bits // 8
    b = b.view(-1, width).flip(1).reshape(-1) if sys.byteorder != "little" else b.clone()
    return b.view(dtype).to(torch.float32)


class Compressor:
    """Base class: subclasses define ``_quantize`` (scales, codes), ``_dequantize`` and the
    code packing; the message layout, sizes and randomness live here."""

    name: str = "base"
    biased: bool = True  # True: error feedback is meaningful; False: unbiased stochastic
    stochastic: bool = False  # draws uniforms for stochastic rounding
    has_scales: bool = True  # False: the message is the packed codes alone
    block_size: int = 0  # elements per scale block (0 = one block for the whole input)
    scale_dtype: torch.dtype = torch.float32  # how scales travel: fp32 (4 B) or bf16 (2 B)

    # -- sizes --------------------------------------------------------------------------
    def _block(self, n: int) -> int:
        return self.block_size if self.block_size > 0 else max(n, 1)

    def nblocks(self, n: int) -> int:
        """Scale blocks of a chunk of n values: ceil(n/block_size), one if block_size is 0."""
        if not self.has_scales or n == 0:
            return 0
        return -(-n // self._block(n))

    def codes_nbytes(self, n: int) -> int:
        raise NotImplementedError

    def wire_nbytes(self, n: int) -> int:
        """Exact message length for n values: scale bytes·nblocks(n) + packed code bytes."""
        return self.scale_nbytes(n) + self.codes_nbytes(n)

    def scale_nbytes(self, n: int) -> int:
        return (torch.finfo(self.scale_dtype).bits // 8) * self.nblocks(n)

    def _round_scales(self, scales: Tensor) -> Tensor:
        """Scales as the receiver will see them (rounded to ``scale_dtype``), so the sender's
        local decode — used for error feedback — equals the remote decode bit for bit."""
        if self.scale_dtype == torch.float32:
            return scales
        return scales.to(self.scale_dtype).to(torch.float32)

    # -- per scheme ---------------------------------------------------------------------
    def _quantize(self, x: Tensor, rand: Tensor | None) -> tuple[Tensor, Tensor]:
        """x fp32 (n,) → (scales fp32 (nblocks,), codes uint8 (n,))."""
        raise NotImplementedError

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def _pack(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def _unpack(self, buf: Tensor, n: int) -> Tensor:
        raise NotImplementedError

    # -- block helpers ------------------------------------------------------------------
    def _blocked(self, x: Tensor) -> Tensor:
        """(n,) → (nblocks, block) with the tail of the last block zero-padded."""
        n = x.numel()
        nb, bs = self.nblocks(n), self._block(n)
        return F.pad(x, (0, nb * bs - n)).view(nb, bs)

    def _counts(self, n: int, device: torch.device) -> Tensor:
        """Real elements per block (fp32): block_size, except the last may be partial."""
        nb, bs = self.nblocks(n), self._block(n)
        starts = torch.arange(nb, device=device, dtype=torch.int64) * bs
        return torch.clamp(n - starts, max=bs).to(torch.float32)

    def _mask(self, n: int, device: torch.device) -> Tensor:
        nb, bs = self.nblocks(n), self._block(n)
        return (torch.arange(nb * bs, device=device) < n).view(nb, bs)

    def _unblocked(self, t: Tensor, n: int) -> Tensor:
        """(nblocks, block) → (n,): drop the padding of the last block."""
        return t.reshape(-1)[:n]

    def _scaled(self, scales: Tensor, values: Tensor) -> Tensor:
        """values (n,) times their block's scale, computed in block shape. (Not as
        ``scales[:, None].expand(nb, bs).reshape(-1)[:n] * values``: with torch 2.13 inductor on
        CPU that form read garbage for the vector-loop tail past the last full block.)"""
        n = values.numel()
        return self._unblocked(scales[:, None] * self._blocked(values), n)

    # -- public API ---------------------------------------------------------------------
    @staticmethod
    def _input(x: Tensor) -> Tensor:
        if x.dim() != 1:
            raise ValueError(f"compressors take a 1-D tensor, got shape {tuple(x.shape)}")
        return x if x.dtype == torch.float32 else x.to(torch.float32)

    def _uniforms(self, x: Tensor, seed: int, rand: Tensor | None) -> Tensor | None:
        if not self.stochastic:
            return None
        n = x.numel()
        if rand is not None:
            if rand.shape != (n,):
                raise ValueError(f"rand must have shape ({n},), got {tuple(rand.shape)}")
            return rand.to(device=x.device, dtype=torch.float32)
        g = torch.Generator(device=x.device)
        g.manual_seed(int(seed))
        return torch.rand(n, generator=g, device=x.device, dtype=torch.float32)

    def _message(self, scales: Tensor, codes: Tensor) -> Tensor:
        packed = self._pack(codes)
        if not self.has_scales:
            return packed
        return torch.cat([_scales_to_bytes(scales, self.scale_dtype), packed])

    def encode(self, x: Tensor, seed: int = 0, rand: Tensor | None = None) -> Tensor:
        """fp32 (n,) → uint8 (wire_nbytes(n),). ``rand`` (fp32 (n,) in [0,1)) replaces the
        generator draw for stochastic schemes; deterministic schemes ignore seed and rand."""
        x = self._input(x)
        scales, codes = self._quantize(x, self._uniforms(x, seed, rand))
        return self._message(self._round_scales(scales), codes)

    def decode(self, buf: Tensor, n: int) -> Tensor:
        """uint8 message of a chunk of n values → fp32 (n,)."""
        if buf.dim() != 1 or buf.dtype != torch.uint8:
            raise ValueError(f"decode takes a 1-D uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
        if buf.numel() != self.wire_nbytes(n):
            raise ValueError(f"{self.name}: message of {buf.numel()} bytes, "
                             f"{self.wire_nbytes(n)} expected for n={n}")
        s = self.scale_nbytes(n)
        scales = _bytes_to_scales(buf[:s], self.scale_dtype)
        return self._dequantize(scales, self._unpack(buf[s:], n))

    def encode_decode(self, x: Tensor, seed: int = 0,
                      rand: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(encode(x), decode(encode(x))), the decode taken from the codes before packing
        (fp32 scales round-trip through bytes exactly, so it equals decode bit for bit)."""
        x = self._input(x)
        scales, codes = self._quantize(x, self._uniforms(x, seed, rand))
        scales = self._round_scales(scales)
        return self._message(scales, codes), self._dequantize(scales, codes)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, block_size={self.block_size}, "
                f"scale_dtype={str(self.scale_dtype).removeprefix('torch.')})")


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"scheme.block_size: must be an int >= 0 (0 = one scale per chunk); "
                         f"got {block_size!r}")
    return block_size


def _check_scale_dtype(name: Any) -> torch.dtype:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"scheme.scale_dtype: must be 'fp32' or 'bf16'; got {name!r}")
    return dtypes[name]


COMPRESSORS: Registry[Callable[..., Compressor]] = Registry("scheme.name")


class _SignBits(Compressor):
    """1 bit per value, bit = x ≥ 0."""

    def codes_nbytes(self, n: int) -> int:
        return wire.packed_nbytes(n, 1)

    def _pack(self, codes: Tensor) -> Tensor:
        return wire.pack_bits(codes)

    def _unpack(self, buf: Tensor, n: int) -> Tensor:
        return wire.unpack_bits(buf, n)


@COMPRESSORS.register("onebit")
class OneBit(_SignBits):
    """1-bit SGD (Seide et al. 2014): a = mean|x| per block, bit = x ≥ 0, decode a·(2b−1).

    Defaults: blocks of 256 values, scales sent as bf16 (1 + 16/256 bits per value, 30.1×
    fewer bytes than fp32). Larger blocks mix tensors of very different magnitude; scaled sign
    then contracts poorly (δ ≥ ‖x‖₁²/(d‖x‖²) of Karimireddy et al.), the error-feedback
    residual grows, and training destabilises — measured on digits at blocks of 512/2048."""

    name = "onebit"
    biased = True

    def __init__(self, *, block_size: int = 256, scale_dtype: str = "bf16") -> None:
        self.block_size = _check_block_size(block_size)
        self.scale_dtype = _check_scale_dtype(scale_dtype)

    def _quantize(self, x: Tensor, rand: Tensor | None) -> tuple[Tensor, Tensor]:
        # fp64 accumulation: the fp32 scale is then independent of summation order, so the
        # eager reference and the compiled/fused paths produce the same bytes.
        total = self._blocked(x).abs().sum(dim=1, dtype=torch.float64)
        a = (total / self._counts(x.numel(), x.device).to(torch.float64)).to(torch.float32)
        return a, (x >= 0).to(torch.uint8)

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        return self._scaled(scales, 2.0 * codes.to(torch.float32) - 1.0)


@COMPRESSORS.register("ef_signsgd")
class EFSignSGD(OneBit):
    """EF-SignSGD (Karimireddy et al. 2019): onebit's message with scale ‖x‖₁/d over the
    whole chunk (block_size 0)."""

    name = "ef_signsgd"

    def __init__(self, *, block_size: int = 0, scale_dtype: str = "fp32") -> None:
        super().__init__(block_size=block_size, scale_dtype=scale_dtype)


@COMPRESSORS.register("signsgd")
class SignSGD(_SignBits):
    """signSGD (Bernstein et al. 2018): bits only, decode ±1. ``block_size`` is accepted for a
    uniform option set and ignored (there are no scales)."""

    name = "signsgd"
    biased = True
    has_scales = False

    def __init__(self, *, block_size: int | None = None) -> None:
        if block_size is not None:
            _check_block_size(block_size)
        self.block_size = 0

    def _quantize(self, x: Tensor, rand: Tensor | None) -> tuple[Tensor, Tensor]:
        return x.new_empty(0), (x >= 0).to(torch.uint8)

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        return 2.0 * codes.to(torch.float32) - 1.0


@COMPRESSORS.register("ternary_grad")
class TernaryGrad(Compressor):
    """TernGrad (Wen et al. 2017): s = max|x| per block (after optional ±clip_sigma·σ
    clipping), t = sign(x)·Bernoulli(|x|/s), code t+1 packed as 2bit or base3."""

    name = "ternary_grad"
    stochastic = True

    def __init__(self, *, block_size: int = 2048, format: str = "2bit",
                 clip_sigma: float = 0.0) -> None:
        self.block_size = _check_block_size(block_size)
        if format not in ("2bit", "base3"):
            raise ValueError(f"scheme.format: must be '2bit' or 'base3'; got {format!r}")
        if not clip_sigma >= 0:
            raise ValueError(f"scheme.clip_sigma: must be >= 0 (0 = off); got {clip_sigma!r}")
        self.format = format
        self.clip_sigma = float(clip_sigma)
        self.biased = self.clip_sigma > 0

    def codes_nbytes(self, n: int) -> int:
        return wire.packed_nbytes(n, 2) if self.format == "2bit" else wire.base3_nbytes(n)

    def _pack(self, codes: Tensor) -> Tensor:
        return wire.pack_2bit(codes) if self.format == "2bit" else wire.pack_base3(codes)

    def _unpack(self, buf: Tensor, n: int) -> Tensor:
        return wire.unpack_2bit(buf, n) if self.format == "2bit" else wire.unpack_base3(buf, n)

    def _quantize(self, x: Tensor, rand: Tensor | None) -> tuple[Tensor, Tensor]:
        assert rand is not None
        n = x.numel()
        xb = self._blocked(x)  # (nblocks, block); padding is 0 and is dropped at the end
        if self.clip_sigma > 0:
            cnt = self._counts(n, x.device).to(torch.float64)  # fp64 sums: see OneBit
            mean = (xb.sum(dim=1, dtype=torch.float64) / cnt).to(torch.float32)
            dev = torch.where(self._mask(n, x.device), xb - mean[:, None], 0.0)
            var = dev.to(torch.float64).square().sum(dim=1) / cnt
            bound = (self.clip_sigma * torch.sqrt(var)).to(torch.float32)[:, None]
            xb = torch.minimum(torch.maximum(xb, -bound), bound)
        s = xb.abs().amax(dim=1)
        p = torch.where(s[:, None] > 0, xb.abs() / s[:, None], 0.0)
        keep = self._blocked(rand) < p  # Bernoulli(|x|/s); false for NaN
        codes = torch.where(keep, torch.where(xb > 0, 2, 0), 1).to(torch.uint8)
        return s, self._unblocked(codes, n)

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        return self._scaled(scales, codes.to(torch.float32) - 1.0)

    def __repr__(self) -> str:
        return (f"TernaryGrad(block_size={self.block_size}, format={self.format!r}, "
                f"clip_sigma={self.clip_sigma})")


@COMPRESSORS.register("qsgd")
class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017): ν = ‖x‖₂ per block, level = stochastic rounding of
    |x|/ν·L with L = 2^(bits−1)−1, code = 2·level + [x<0] in ``bits`` bits."""

    name = "qsgd"
    biased = False
    stochastic = True

    def __init__(self, *, block_size: int = 2048, bits: int = 4) -> None:
        self.block_size = _check_block_size(block_size)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"scheme.bits: must be an int in [2, 8]; got {bits!r}")
        self.bits = bits
        self.levels = (1 << (bits - 1)) - 1

    def codes_nbytes(self, n: int) -> int:
        return wire.packed_nbytes(n, self.bits)

    def _pack(self, codes: Tensor) -> Tensor:
        return wire.pack_kbit(codes, self.bits)

    def _unpack(self, buf: Tensor, n: int) -> Tensor:
        return wire.unpack_kbit(buf, self.bits, n)

    def _quantize(self, x: Tensor, rand: Tensor | None) -> tuple[Tensor, Tensor]:
        assert rand is not None
        xb = self._blocked(x)  # (nblocks, block); padding is 0 and is dropped at the end
        nu = xb.to(torch.float64).square().sum(dim=1).sqrt().to(torch.float32)  # fp64: see OneBit
        ell = torch.where(nu[:, None] > 0, xb.abs() / nu[:, None], 0.0) * self.levels
        lo = torch.floor(ell)
        level = lo + (self._blocked(rand) < ell - lo).to(torch.float32)
        # NaN levels (a non-finite block) become 0; the block's scale stays non-finite.
        level = torch.nan_to_num(level, nan=0.0).clamp(0, self.levels).to(torch.uint8)
        codes = level * 2 + (xb < 0).to(torch.uint8)
        return nu, self._unblocked(codes, x.numel())

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        level = (codes >> 1).to(torch.float32)
        sign = 1.0 - 2.0 * (codes & 1).to(torch.float32)
        # ν·(±1)·level/L, evaluated as (ν·(±1))·level/L in block shape
        n = codes.numel()
        signed = scales[:, None] * self._blocked(sign)
        return self._unblocked(signed * self._blocked(level) / self.levels, n)

    def __repr__(self) -> str:
        return f"QSGD(block_size={self.block_size}, bits={self.bits})"


def build_compressor(name: str, **options: Any) -> Compressor:
    """``COMPRESSORS.get(name)(**options)``; an option the scheme does not take is a
    ValueError naming ``scheme.<option>`` and listing the accepted ones."""
    cls = COMPRESSORS.get(name)
    accepted = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"scheme.{unknown[0]}: not an option of compressor '{name}'; "
                         f"accepted: {', '.join(accepted) or '(none)'}")
    return cls(**options)

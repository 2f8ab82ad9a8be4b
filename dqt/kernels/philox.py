"""Counter-based random numbers shared by every implementation of the stochastic wire formats.

**Philox4x32-10** (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011), exactly as Triton's ``tl.philox`` computes it: counter (c₀, c₁, c₂, c₃), key
(k₀, k₁) = (seed mod 2³², seed >> 32); ten rounds of::

    c₀' = hi(0xCD9E8D57·c₂) ⊕ c₁ ⊕ k₀      c₁' = lo(0xCD9E8D57·c₂)
    c₂' = hi(0xD2511F53·c₀) ⊕ c₃ ⊕ k₁      c₃' = lo(0xD2511F53·c₀)
    k₀ += 0x9E3779B9,  k₁ += 0xBB67AE85     (mod 2³²)

A stochastic block (see :mod:`dqt.kernels.blockq`) draws 16 random bits per value: one
Philox call (4 words of 32 bits) serves 8 values. Value j of block ``ctr`` takes, from counter
(j // 8, ctr, 0, 0), output t = j mod 4, half h = (j mod 8) // 4, i.e.
r₁₆ = (out_t >> 16h) & 0xFFFF (values 8q..8q+3 the low halves of the four outputs, 8q+4..8q+7
their high halves), and turns it into the uniform u = (2·r₁₆ + 1)·2⁻¹⁷, the midpoint of the
r₁₆-th of 2¹⁶ equal cells of [0, 1). u is exact in fp32, so the torch reference, the C kernel
and the Triton kernel (GPU or interpreter) all see the same u and make the same rounding
decisions. For a threshold p ∈ [0, 1], P(u < p) = ⌈p·2¹⁶ − ½⌉·2⁻¹⁶ (p rounded to the nearest
multiple of 2⁻¹⁶, ties down), so |P(u < p) − p| ≤ 2⁻¹⁷.

``mix_seed`` derives the Philox key per (seed, step, rank, bucket, phase) with SplitMix64
(Steele, Lea, Flood, OOPSLA 2014; constants of Vigna's ``splitmix64.c``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["M32", "UNIFORM_BITS", "VALUES_PER_CALL", "mix_seed", "philox4x32", "uniforms"]

M32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
UNIFORM_BITS = 16  # random bits per value
VALUES_PER_CALL = 8  # values served by one Philox4x32 call: 4 words × 32 bits / 16


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*ints: int) -> int:
    """A 63-bit key from integers such as (seed, step, rank, bucket, phase), order-sensitive.

    h₀ = 0; hᵢ = splitmix64(hᵢ₋₁ ⊕ (vᵢ mod 2⁶⁴)); result hₘ >> 1 (fits a signed int64).
    ``mix_seed(0)`` is SplitMix64's first output from state 0 (0xE220A8397B1DCDAF) >> 1.
    """
    if not ints:
        raise ValueError("mix_seed needs at least one integer")
    h = 0
    for v in ints:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    # b holds u32 values in int64; a·b < 2⁶⁴ wraps in int64 two's complement, and the high and
    # low words are read back with an arithmetic shift + mask, which is exact.
    p = b * a
    return (p >> 32) & M32, p & M32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, key: int,
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` on int64 tensors holding u32 counters; returns four u32 tensors."""
    k0, k1 = key & M32, (key >> 32) & M32
    c0, c1, c2, c3 = (c.to(torch.int64) & M32 for c in (c0, c1, c2, c3))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & M32, (k1 + KEY_B) & M32
    return c0, c1, c2, c3


def uniforms(key: int, counters: Tensor, width: int) -> Tensor:
    """fp32 uniforms of shape (len(counters), width): row k, column j is (2·r₁₆ + 1)·2⁻¹⁷ with
    r₁₆ = (philox(key, (j // 8, counters[k], 0, 0))[j mod 4] >> 16·((j mod 8) // 4)) & 0xFFFF;
    width is a multiple of 8."""
    if width % VALUES_PER_CALL:
        raise ValueError(f"width must be a multiple of {VALUES_PER_CALL}; got {width}")
    ctr = counters.to(torch.int64).reshape(-1, 1)
    q = torch.arange(width // VALUES_PER_CALL, dtype=torch.int64, device=ctr.device).reshape(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device=ctr.device)
    r = philox4x32(q.expand(ctr.shape[0], -1), ctr.expand(-1, q.shape[1]), zero, zero, key)
    words = torch.stack(r, dim=-1)  # (K, width // 8, 4): [k, q, t] = output t of counter q
    r16 = torch.stack([words & 0xFFFF, words >> 16], dim=-2)  # (K, width // 8, 2, 4): [.., h, t]
    return (2 * r16.reshape(ctr.shape[0], width) + 1).to(torch.float32) * (2.0 ** -17)

"""The wire format of block quantization: the exact maths of every gradient compressor, the
block table, and the integer codes the kernels use. Implemented by the pure-torch reference
(:mod:`dqt.kernels.blockq.reference`), the C kernel for CPU tensors
(:mod:`dqt.kernels.blockq.cpu`) and the Triton kernels (:mod:`dqt.kernels.blockq.triton_impl`);
:mod:`dqt.kernels.blockq` dispatches between them.

**Blocks and the table.** Data is cut into *blocks* of at most ``spec.block`` values; the
caller (``dqt.comm.layout``) makes blocks that never cross a parameter tensor. A block table is
an int64 tensor (nblocks, 8), one row per block::

    DATA  first value in the data tensor (input of encode, output of decode)
    RES   first value in the residual buffer (error feedback; ignored without one)
    LEN   number of values, 1 ≤ LEN ≤ block
    MSG   byte offset of the message the block belongs to
    SCALE byte offset of the block's scale (sign_two: its two scales), relative to MSG
    CODE  byte offset of the block's codes, relative to MSG
    CTR   the block's Philox counter (its index in the bucket)

**The message of a block** is its scale (``scale`` = fp32: 4 bytes little-endian; bf16: 2
bytes, rounded to nearest even; e8m0: 1 byte, a power of two — see below; none; ``sign_two``
carries two scales, :attr:`BlockSpec.scale_nbytes` counts both) and its codes
packed on their own, starting at a byte:
``code_bits`` = k ∈ 1..8 is a little-endian bit stream (value j at bits [jk, jk+k), bit b in
byte b//8 at b%8), ceil(LEN·k/8) bytes; ``code_bits = 0`` is base-3, byte b = Σ_{m<5} 3^m·code[5b+m],
ceil(LEN/5) bytes. Padding bits and trits are 0.

**Per block**, with v the block's values (x, plus S·e with error feedback, S the loss scale):

* ``sign_mean`` (1-bit SGD, Seide et al. 2014, with one symmetric scale; EF-SignSGD,
  Karimireddy et al. 2019): a = fp32(Σ|vᵢ| / LEN) (sum in fp64), the L2-optimal scale of
  a·sign(v); code = [vᵢ ≥ 0]; decode ±a.
* ``sign_two`` (1-bit SGD with the paper's two reconstruction values, Seide et al. 2014):
  code = [vᵢ ≥ 0]; n_c values have code c; the block carries *two* scales, the mean
  magnitudes of the two groups, m₀ = fp32(Σ_{vᵢ<0} |vᵢ| / n₀) and m₁ = fp32(Σ_{vᵢ≥0} |vᵢ| / n₁)
  (sums in fp64; m_c = 0 when n_c = 0), each rounded to the scale format; decode code 1 → +m₁,
  code 0 → −m₀. So a₁ = m₁ is the mean of the non-negative values and a₀ = −m₀ the mean of
  the negative ones, the L2-optimal value of each group. Both are sent as magnitudes (e8m0 is
  unsigned; −m₀ rounds like m₀ in every format, all of which round symmetrically): the
  block's scale field is m₀ then m₁, each in the scale format (twice the bytes of one scale:
  fp32 8, bf16 4, e8m0 2), m₁ at SCALE + the bytes of one scale.
* ``sign`` (signSGD, Bernstein et al. 2018): no scale; code = [vᵢ ≥ 0]; decode ±1.
* ``ternary`` (TernGrad, Wen et al. 2017): optional clipping to ±c·σ (μ = fp32(Σv/LEN),
  σ² = Σ(vᵢ − μ)²/LEN in fp64, bound = fp32(c·σ)); s = max|vᵢ|; keep = (uᵢ·s < |vᵢ|), i.e.
  Bernoulli(|vᵢ|/s); code tᵢ + 1 = keep ? (vᵢ > 0 ? 2 : 0) : 1; decode −s, +0, +s.
  E[decode] = v without clipping (unbiased).
* ``qsgd`` (QSGD, Alistarh et al. 2017), L = ``levels``: ν = fp32(√Σvᵢ²) (fp64);
  ℓᵢ = (|vᵢ|·r)·L with r = fp32(1/ν) (0 when ν = 0 or 1/ν overflows); levelᵢ = ⌊ℓᵢ⌋ +
  [uᵢ < ℓᵢ − ⌊ℓᵢ⌋], clamped to [0, L]; code = 2·level + [vᵢ < 0]; decode ±level·fp32(ν/L).
  E[level] = ℓ, so unbiased (up to the rounding of r).
* ``fp8_e4m3`` / ``fp8_e5m2`` (8-bit floats, OCP ``float8_e4m3fn``: max 448, no inf;
  ``float8_e5m2``: max 57344), ``code_bits`` = 8: the scale s is the smallest power of two
  2^P, P ≥ −126, with max|vᵢ| ≤ FMAX·2^P (FMAX = 1.75·2^F, F = 8 or 15: from the bits of
  max|vᵢ|, P = E − F + [mantissa > 0.75] for max|vᵢ| = m·2^E; 2⁻¹²⁶ for a subnormal max; 0 for
  a zero block) — the shared exponent of the OCP Microscaling formats, rounded up so that no
  value saturates. Being a power of two, s is the same in every scale format (so ``e8m0``
  costs nothing), vᵢ / s is exact unless it underflows, and 1/s is exact, so kernels multiply.
  Code = the fp8 byte of clamp(vᵢ / s, −FMAX, FMAX) (round to nearest even: what ``torch``'s
  cast gives), all codes 0 when s = 0; decode fp8(code)·s. Deterministic; the error is at
  most half an fp8 step (2⁻⁴ / 2⁻³ of a normal value), exactly the error of casting vᵢ itself
  when fp8's range covers it.

**e8m0 scales** (the shared-exponent scale of the OCP Microscaling formats): byte e encodes
2^(e − 127) for 1 ≤ e ≤ 254, 0 for e = 0 (here exactly zero) and NaN for 255. A statistic
a = m·2^E (1 ≤ m < 2) is rounded to the nearest power of two in the log domain — e = E + 127
+ [m ≥ √2], i.e. fp32 mantissa bits ≥ 3474676 — with integer operations only; subnormal a
becomes 0 and e is capped at 254. One byte per block lets blocks be small (1-bit SGD: 128
values at 1.0625 bits per value) — what matters for accuracy — at the price of a coarser scale,
whose error the error feedback absorbs.

u is the Philox uniform of :mod:`dqt.kernels.philox` for (key, CTR, value index): 16 bits,
(2·r₁₆ + 1)·2⁻¹⁷, so P(u < p) is within 2⁻¹⁷ of p and "unbiased" above holds up to 2⁻¹⁷ of a
level spacing (s for ternary, ν/L for qsgd) per value. The scale
used for coding and for the local decode is the *transmitted* (rounded) one, so the sender's
error feedback e' = (v − decode)·fp32(1/S) matches what every receiver decodes.

**Non-finite blocks.** A block holding inf/NaN (or whose rounded scale is not finite) is sent
as scale NaN (``sign_two``: both scales) and all-zero codes, decodes to NaN everywhere, and
leaves its residual untouched; ``bad[k]`` reports it (``sign`` has no scale, so callers carry a
flag byte).

**Decode** reads, for each block, ``npeers`` messages ``peer_stride`` bytes apart, sums their
decodes in peer order (d₀ + d₁ + …, fp32), then ``mode``: ``copy``, ``mean`` (× fp32(1/npeers):
one reciprocal per call, like the per-block reciprocals above, instead of a division per value)
or ``vote`` (sign of the sum, majority vote; NaN stays NaN); a message whose byte at
``flag_off`` (≥ 0) is non-zero decodes to NaN. The result lands at DATA.

**Kernel codes.** The kernels name kinds, scale formats and decode modes by the integers of
:data:`CODES`, the one table of them; :data:`KERNEL_CONSTANTS` adds the table columns and the
bit patterns above under the names the kernels use (``KIND_QSGD``, ``SCALE_E8M0``,
``MODE_VOTE``, ``DATA``, ``E8M0_NAN``, ...). The C kernel receives them as ``-D`` flags at
build time, the Triton kernels as ``tl.constexpr`` globals.

Every implementation — the reference, the C kernel, the Triton kernels — performs the same
IEEE operations in the same order, except the fp64 block sums, whose order differs; an fp64
sum of fp32 values rounds back to the same fp32 scale except with probability ~2⁻²⁹ per block.
Tests compare the bytes of all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BF16_NAN", "BlockSpec", "CODES", "COLUMN_NAMES", "COLUMNS", "E8M0_MAX", "E8M0_NAN",
           "E8M0_ROUND_UP", "FP32_NAN", "FP8_DTYPES", "FP8_EXP", "FP8_MAX", "KERNEL_CONSTANTS",
           "KINDS", "MODES", "SCALES",
           "f32_recip", "linear_table", "table_from_rows",
           "DATA", "RES", "LEN", "MSG", "SCALE", "CODE", "CTR"]

# ---------------------------------------------------------------- the table
DATA, RES, LEN, MSG, SCALE, CODE, CTR = range(7)
COLUMN_NAMES = ("DATA", "RES", "LEN", "MSG", "SCALE", "CODE", "CTR")
COLUMNS = 8  # the 8th column is reserved (0)

# ---------------------------------------------------------------- the codes of the kernels
# The single source of truth for the integers by which the C and Triton kernels name a block
# kind, a scale format and a decode mode. The constant of (group, name) is
# f"{group}_{name}".upper(): KIND_SIGN_MEAN, SCALE_FP32, MODE_VOTE, ...
CODES: dict[str, dict[str, int]] = {
    "kind": {"sign_mean": 0, "sign": 1, "ternary": 2, "qsgd": 3, "sign_two": 4, "fp8_e4m3": 5,
             "fp8_e5m2": 6},
    "scale": {"none": 0, "fp32": 1, "bf16": 2, "e8m0": 3},
    "mode": {"copy": 0, "mean": 1, "vote": 2},
}
KINDS = tuple(CODES["kind"])
MODES = tuple(CODES["mode"])

# ---------------------------------------------------------------- scales
SCALES = {"none": 0, "fp32": 4, "bf16": 2, "e8m0": 1}  # scale format -> bytes per scale
E8M0_ROUND_UP = 3474676  # fp32 mantissa bits of √2 (rounded up): m >= √2 rounds 2^E up
E8M0_MAX = 254  # the largest finite e8m0 byte, 2^127
E8M0_NAN = 255  # the e8m0 byte of NaN
BF16_NAN = 0x7FC0  # the bf16 bits of a non-finite block's scale
FP32_NAN = 0x7FC00000  # the fp32 bits of a non-finite block's scale
# fp8 kinds -> (the largest finite value, the torch dtype whose cast rounds and decodes them)
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8_EXP = {"fp8_e4m3": 8, "fp8_e5m2": 15}  # F with FMAX = 1.75·2^F
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# Every integer constant the kernels name, under the name they use: the columns, the codes,
# the bit patterns of scales. cpu.py passes each to the C compiler as -D DQT_<NAME>=<value>;
# triton_common.py defines each as a tl.constexpr global.
KERNEL_CONSTANTS: dict[str, int] = {
    **{name: i for i, name in enumerate(COLUMN_NAMES)},
    "COLUMNS": COLUMNS,
    **{f"{group}_{name}".upper(): c for group, names in CODES.items() for name, c in names.items()},
    "E8M0_ROUND_UP": E8M0_ROUND_UP,
    "E8M0_MAX": E8M0_MAX,
    "E8M0_NAN": E8M0_NAN,
    "BF16_NAN": BF16_NAN,
    "FP32_NAN": FP32_NAN,
}


@dataclass(frozen=True)
class BlockSpec:
    """What a block carries: ``kind`` (KINDS), at most ``block`` values (a multiple of 8),
    ``code_bits`` per value (1..8; 0 = base-3, 5 per byte), ``scale`` none/fp32/bf16/e8m0,
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
        if self.kind == "sign_two" and self.code_bits == 0:
            raise ValueError("kind 'sign_two' needs code_bits >= 1 (base-3 is for ternary codes)")
        if self.kind in FP8_MAX and self.code_bits != 8:
            raise ValueError(f"kind {self.kind!r} needs code_bits = 8; got {self.code_bits!r}")
        if self.kind == "qsgd" and not (1 <= self.levels and 2 * self.levels < 1 << self.code_bits):
            raise ValueError(f"qsgd needs 1 <= levels and 2*levels < 2^code_bits; got "
                             f"levels={self.levels}, code_bits={self.code_bits}")

    @property
    def stochastic(self) -> bool:
        return self.kind in ("ternary", "qsgd")

    @property
    def scales_per_block(self) -> int:
        """Scales a block carries: 2 for ``sign_two`` (m₀, m₁), 0 for ``sign``, else 1."""
        return 0 if self.scale == "none" else (2 if self.kind == "sign_two" else 1)

    @property
    def scale_nbytes(self) -> int:
        """Bytes of a block's scale field: every scale it carries, one after the other."""
        return SCALES[self.scale] * self.scales_per_block

    def code_nbytes(self, n: int) -> int:
        return (n + 4) // 5 if self.code_bits == 0 else (n * self.code_bits + 7) // 8

    def message_nbytes(self, lengths: list[int]) -> int:
        """Bytes of a message holding blocks of these lengths: scales first, then codes."""
        return self.scale_nbytes * len(lengths) + sum(self.code_nbytes(n) for n in lengths)


def table_from_rows(rows: list[tuple[int, ...]], device: torch.device | str = "cpu") -> Tensor:
    """(DATA, RES, LEN, MSG, SCALE, CODE, CTR) tuples → the int64 (nblocks, 8) table."""
    t = torch.zeros(len(rows), COLUMNS, dtype=torch.int64)
    if rows:
        t[:, :len(COLUMN_NAMES)] = torch.tensor(rows, dtype=torch.int64)
    return t.to(device)


def linear_table(spec: BlockSpec, n: int, device: torch.device | str = "cpu"
                 ) -> tuple[Tensor, int]:
    """The table of one 1-D tensor of n values as one message: blocks of ``spec.block`` (the
    last partial), residual offsets = data offsets, counters 0, 1, ...; returns (table, bytes)."""
    lengths = [min(spec.block, n - s) for s in range(0, n, spec.block)]
    off, rows = spec.scale_nbytes * len(lengths), []
    for k, (start, ln) in enumerate(zip(range(0, n, spec.block), lengths)):
        rows.append((start, start, ln, 0, k * spec.scale_nbytes, off, k))
        off += spec.code_nbytes(ln)
    return table_from_rows(rows, device), off


def f32_recip(x: float) -> float:
    """fp32(1/x), the IEEE fp32 quotient (what every implementation multiplies by)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(x, dtype=torch.float32))

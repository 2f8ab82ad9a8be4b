"""What the Triton kernels of :mod:`dqt.kernels.blockq` share: the constants of the format,
as ``tl.constexpr`` globals (Triton kernels may read a global only if it is one), and the jit
helpers that encode and decode both use.

Every constant is :data:`~dqt.kernels.blockq.format.KERNEL_CONSTANTS`' value under the same
name — the table columns (``DATA`` ... ``CTR``, ``COLUMNS``), the kind, scale-format and mode
codes (``KIND_QSGD``, ``SCALE_E8M0``, ``MODE_VOTE``, ...) and the scale bit patterns — so the
kernels name them instead of spelling numbers. This module needs triton; only
:mod:`dqt.kernels.blockq.triton_impl` imports it, and only when triton is installed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from dqt.kernels.blockq.format import KERNEL_CONSTANTS as _K

# the table columns
DATA = tl.constexpr(_K["DATA"])
RES = tl.constexpr(_K["RES"])
LEN = tl.constexpr(_K["LEN"])
MSG = tl.constexpr(_K["MSG"])
SCALE = tl.constexpr(_K["SCALE"])
CODE = tl.constexpr(_K["CODE"])
CTR = tl.constexpr(_K["CTR"])
COLUMNS = tl.constexpr(_K["COLUMNS"])
# block kinds
KIND_SIGN_MEAN = tl.constexpr(_K["KIND_SIGN_MEAN"])
KIND_SIGN = tl.constexpr(_K["KIND_SIGN"])
KIND_TERNARY = tl.constexpr(_K["KIND_TERNARY"])
KIND_QSGD = tl.constexpr(_K["KIND_QSGD"])
KIND_SIGN_TWO = tl.constexpr(_K["KIND_SIGN_TWO"])
KIND_FP8_E4M3 = tl.constexpr(_K["KIND_FP8_E4M3"])
KIND_FP8_E5M2 = tl.constexpr(_K["KIND_FP8_E5M2"])
# scale formats
SCALE_NONE = tl.constexpr(_K["SCALE_NONE"])
SCALE_FP32 = tl.constexpr(_K["SCALE_FP32"])
SCALE_BF16 = tl.constexpr(_K["SCALE_BF16"])
SCALE_E8M0 = tl.constexpr(_K["SCALE_E8M0"])
# decode modes
MODE_COPY = tl.constexpr(_K["MODE_COPY"])
MODE_MEAN = tl.constexpr(_K["MODE_MEAN"])
MODE_VOTE = tl.constexpr(_K["MODE_VOTE"])
# scale bit patterns
E8M0_ROUND_UP = tl.constexpr(_K["E8M0_ROUND_UP"])
E8M0_MAX = tl.constexpr(_K["E8M0_MAX"])
E8M0_NAN = tl.constexpr(_K["E8M0_NAN"])
BF16_NAN = tl.constexpr(_K["BF16_NAN"])
FP32_NAN = tl.constexpr(_K["FP32_NAN"])


@triton.jit
def fp8_value(c, MBITS: tl.constexpr, BIAS: tl.constexpr, SUB_STEP: tl.constexpr):
    """fp8 bytes (int32) → fp32, exact: MBITS mantissa bits, exponent bias BIAS, SUB_STEP the
    subnormal step; e4m3fn's 0x7F and e5m2's top exponent decode to NaN / inf."""
    c = c.to(tl.uint32)
    a = c & 0x7F
    sign = (c & 0x80) << 24
    nrm = (a << (23 - MBITS)) + ((127 - BIAS) << 23)
    sub = (a.to(tl.int32).to(tl.float32) * SUB_STEP).to(tl.uint32, bitcast=True)
    m = tl.where(a >= (1 << MBITS), nrm, sub)
    if MBITS == 3:
        m = tl.where(a == 0x7F, 0x7FC00000, m)
    else:
        m = tl.where(a >= 0x7C, 0x7F800000 | ((a & 3) << 21), m)
    return (m | sign).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_value(e):
    """e8m0 byte → fp32: 2^(e − 127), 0 for 0, NaN for E8M0_NAN."""
    v = (e.to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 0, 0.0, tl.where(e == E8M0_NAN, float("nan"), v))

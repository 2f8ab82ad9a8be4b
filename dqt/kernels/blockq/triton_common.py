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
def e8m0_value(e):
    """e8m0 byte → fp32: 2^(e − 127), 0 for 0, NaN for E8M0_NAN."""
    v = (e.to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 0, 0.0, tl.where(e == E8M0_NAN, float("nan"), v))

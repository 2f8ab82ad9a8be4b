"""Block quantization for the wire: every gradient compressor's format (:mod:`.format`), its
pure-torch reference (:mod:`.reference`), a fused C kernel for CPU tensors (:mod:`.cpu`) and
Triton kernels (:mod:`.triton_impl`), all producing the same bytes — and :func:`encode` /
:func:`decode`, which dispatch to the fastest implementation available for the tensors' device.

Modules import one way: ``format`` ← ``reference`` ← ``cpu``, ``triton_impl`` ← this package.
The kernels are imported on first use: importing this package builds no C code, imports no
triton and touches no device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dqt.kernels.blockq.format import (BF16_NAN, CODE, CODES, COLUMN_NAMES, COLUMNS, CTR, DATA,
                                        E8M0_MAX, E8M0_NAN, E8M0_ROUND_UP, FP32_NAN,
                                        KERNEL_CONSTANTS, KINDS, LEN, MODES, MSG, RES, SCALE,
                                        SCALES, BlockSpec, f32_recip, linear_table,
                                        table_from_rows)
from dqt.kernels.blockq.reference import decode_ref, encode_ref
from dqt.kernels.blockq.reference import _e8m0_code, _e8m0_value  # noqa: F401  (used by tests)

__all__ = ["BF16_NAN", "BlockSpec", "CODE", "CODES", "COLUMN_NAMES", "COLUMNS", "CTR", "DATA",
           "E8M0_MAX", "E8M0_NAN", "E8M0_ROUND_UP", "FP32_NAN", "Impl", "KERNEL_CONSTANTS",
           "KINDS", "LEN", "MODES", "MSG", "RES", "SCALE", "SCALES", "available_impls", "decode",
           "decode_ref", "encode", "encode_ref", "f32_recip", "linear_table", "table_from_rows"]

Impl = Literal["auto", "reference", "c", "triton"]


def available_impls(device: torch.device | str) -> list[str]:
    """Implementations usable for tensors on ``device``, fastest first."""
    dev = torch.device(device)
    out = []
    if dev.type == "cuda":
        from dqt.kernels.blockq import triton_impl

        if triton_impl.available():
            out.append("triton")
    elif dev.type == "cpu":
        from dqt.kernels.blockq import cpu

        if cpu.available():
            out.append("c")
        from dqt.kernels.blockq import triton_impl

        if triton_impl.interpreting():
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
        from dqt.kernels.blockq import cpu

        return cpu
    from dqt.kernels.blockq import triton_impl

    return triton_impl


def encode(spec: BlockSpec, x: Tensor, table: Tensor, msg: Tensor,
           residual: Tensor | None = None, grad_scale: float = 1.0, key: int = 0,
           bad: Tensor | None = None, impl: Impl = "auto") -> None:
    """Encode the blocks of ``table`` from fp32 ``x`` into ``msg`` (the format:
    :mod:`dqt.kernels.blockq.format`). ``residual`` (fp32, updated in place) turns on error
    feedback with loss scale ``grad_scale``; ``key`` seeds the Philox stream of stochastic
    kinds; ``bad`` (int32 (nblocks,)) receives the non-finite flags."""
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
    if mode not in MODES:
        raise ValueError(f"mode must be copy, mean or vote; got {mode!r}")
    _check(out, table, msg)
    which = _resolve(impl, out.device)
    run = decode_ref if which == "reference" else _implementation(which).decode
    run(spec, msg, table, out, npeers, peer_stride, flag_off, mode)

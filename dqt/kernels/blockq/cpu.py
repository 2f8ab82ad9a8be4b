"""The CPU implementation of :mod:`dqt.kernels.blockq`: ``cpu.c``, compiled on first use.

The C file is built once per machine with the system C compiler (``$CC``, else ``cc``) into
``$DQT_KERNEL_CACHE`` (default ``~/.cache/dqt/kernels``, read when the library is first
built), under a name that hashes the source and the flags, and loaded with ctypes — no torch
headers, so the build takes about a second. Flags: ``-O3 -march=native -ffp-contract=off
-fopenmp`` (``-ffp-contract=off``: no fused multiply-add, so products and sums round exactly
like the torch reference), plus one ``-DDQT_<NAME>=<value>`` per entry of
:data:`~dqt.kernels.blockq.format.KERNEL_CONSTANTS` (:func:`defines`): the C code has no
table columns, kind, scale or mode codes of its own, and a changed code changes the hash, so
the library is rebuilt. If no compiler is found or the build fails, :func:`available` is False
and dispatch falls back to the reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from dqt.kernels.blockq.format import CODES, KERNEL_CONSTANTS, f32_recip

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
          "-shared", "-fPIC", "-std=c11"]
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_FAILED: str | None = None


def defines() -> list[str]:
    """The -D flags that give the C code its constants, from the format's one table."""
    return [f"-DDQT_{name}={value}" for name, value in KERNEL_CONSTANTS.items()]


def flags() -> list[str]:
    """Every flag of the build (the defines included), as hashed into the library's name."""
    return [*_FLAGS, *defines()]


class _Spec(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("block", ctypes.c_int32),
                ("code_bits", ctypes.c_int32), ("scale_fmt", ctypes.c_int32),
                ("levels", ctypes.c_int32), ("pad", ctypes.c_int32), ("clip", ctypes.c_double)]


def _cache_dir() -> Path:
    return Path(os.environ.get("DQT_KERNEL_CACHE", Path.home() / ".cache" / "dqt" / "kernels"))


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set $CC or install gcc)")
    src, opts = _SOURCE.read_bytes(), flags()
    tag = hashlib.sha256(src + " ".join([cc, *opts]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"blockq_{tag}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *opts, str(_SOURCE), "-o", tmp, "-lm"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed building {_SOURCE.name}:\n{proc.stderr[-2000:]}")
            os.replace(tmp, out)  # atomic: concurrent builders end with one complete file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    p, i64, f32, u64, i32 = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64,
                             ctypes.c_int)
    lib.dqt_encode.argtypes = [ctypes.POINTER(_Spec), p, p, i64, p, p, f32, f32, u64, p, i32]
    lib.dqt_encode.restype = None
    lib.dqt_decode.argtypes = [ctypes.POINTER(_Spec), p, p, i64, i64, i64, i64, i32, p, i32]
    lib.dqt_decode.restype = None
    return lib


def _lib() -> ctypes.CDLL | None:
    global _LIB, _FAILED
    if _LIB is None and _FAILED is None:
        with _LOCK:
            if _LIB is None and _FAILED is None:
                try:
                    _LIB = _build()
                except Exception as e:  # no compiler, no OpenMP, ...: fall back, say so once
                    _FAILED = str(e)
                    log.warning("dqt: the fused CPU kernels are unavailable (%s); using the "
                                "pure-torch reference", e)
    return _LIB


def available() -> bool:
    return _lib() is not None


def _spec(spec) -> _Spec:
    return _Spec(CODES["kind"][spec.kind], spec.block, spec.code_bits, CODES["scale"][spec.scale],
                 spec.levels, 0, float(spec.clip))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def encode(spec, x: Tensor, table: Tensor, msg: Tensor, residual: Tensor | None,
           grad_scale: float, key: int, bad: Tensor | None) -> None:
    if residual is not None and (residual.dtype != torch.float32 or not residual.is_contiguous()):
        raise ValueError("residual must be a contiguous fp32 tensor")
    if bad is not None and (bad.dtype != torch.int32 or bad.numel() != table.shape[0]):
        raise ValueError("bad must be int32 with one entry per block")
    _lib().dqt_encode(ctypes.byref(_spec(spec)), x.data_ptr(), table.data_ptr(),
                      table.shape[0], msg.data_ptr(), _ptr(residual), float(grad_scale),
                      f32_recip(grad_scale), int(key) & ((1 << 64) - 1), _ptr(bad),
                      torch.get_num_threads())


def decode(spec, msg: Tensor, table: Tensor, out: Tensor, npeers: int, peer_stride: int,
           flag_off: int, mode: str) -> None:
    _lib().dqt_decode(ctypes.byref(_spec(spec)), msg.data_ptr(), table.data_ptr(),
                      table.shape[0], npeers, peer_stride, flag_off, CODES["mode"][mode],
                      out.data_ptr(), torch.get_num_threads())

"""The Triton implementation of :mod:`dqt.kernels.blockq`: the launchers of the kernels in
:mod:`~dqt.kernels.blockq.triton_encode` and :mod:`~dqt.kernels.blockq.triton_decode`.

``encode``: one program per block. ``decode``: several blocks per program (``DECODE_TILE``
values, ``DECODE_WARPS`` warps), by one of three kernels. Blocks of 1/2/4/8-bit codes whose
data offset, length and code offset are multiples of 4 (every block of a bucket whose tensors
are multiples of 4 values long; the layout pads messages to whole words) go to the *word*
kernel; base-3 blocks go to the *trit* kernel; the rest to the *byte* kernel. The environment
switches ``DQT_DECODE_WORDS=0`` / ``DQT_DECODE_TRITS=0`` turn the word / trit kernel off (the
benchmark times every kernel that can take a scheme); they are read at each call.

The arithmetic is the reference's, operation for operation: divisions use ``tl.math.div_rn``
(IEEE round-to-nearest; Triton's ``/`` on fp32 is approximate on NVIDIA GPUs) and kernels are
launched with ``enable_fp_fusion=False`` so ``x + e·S`` is not contracted into an FMA.

**Interpreter.** Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is
how CI checks them against the reference without a GPU. Triton decides between its
interpreter and the GPU compiler when it decorates a kernel — here, when this module imports
the kernel modules — so ``TRITON_INTERPRET`` must be set before this module is first imported,
and it is read once, then, like the kernels themselves (:func:`interpreting`).

Importing this module never touches a device; if triton is missing, :func:`available` and
:func:`interpreting` are False.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from dqt.kernels.blockq.format import CODE, CODES, DATA, LEN, MSG, SCALE, SCALES, f32_recip

try:
    import triton
    import triton.language  # noqa: F401
except ImportError:  # triton is an optional extra
    triton = None

if triton is not None:
    # decorating the kernels decides interpreter vs GPU: TRITON_INTERPRET is read at the same time
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
    from dqt.kernels.blockq.triton_decode import (decode_kernel, decode_trits_kernel,
                                                  decode_words_kernel)
    from dqt.kernels.blockq.triton_encode import encode_kernel
else:
    _INTERPRET = False

# decode: values (lanes) per program and warps per program; blocks smaller than the tile are
# batched BPP to a program so each program has enough loads in flight (the benchmark sweeps these)
DECODE_TILE = 2048
DECODE_WARPS = 4
# the word kernel (aligned rows of 1/2/4/8-bit codes)
WORDS_TILE = 2048
WORDS_WARPS = 4
# blocks under this many values keep the byte kernel: with 128-value blocks (onebit) the word
# kernel compiles to more instructions per value (per-block work, 16 blocks per program) and the
# byte kernel was measured at 85-90 % of clone on an H100; the benchmark times both
WORDS_MIN_BLOCK = 256
# base-3: the trit-major kernel (a lane per code byte, chunks of TRITS_CHUNK bytes, about
# TRITS_TILE bytes per program)
TRITS_CHUNK = 512
TRITS_TILE = 512
ENCODE_VALUES_PER_THREAD = 8


def available() -> bool:
    """Triton kernels can run on CUDA tensors here."""
    return triton is not None and not _INTERPRET and torch.cuda.is_available()


def interpreting() -> bool:
    """Triton kernels run through the interpreter on CPU tensors here."""
    return triton is not None and _INTERPRET


def _switch(name: str) -> bool:
    """An on/off switch from the environment, read at each call: on unless set to "0"."""
    return os.environ.get(name, "1") != "0"


def decode_words_enabled() -> bool:
    """The word decode kernel may be used (``DQT_DECODE_WORDS`` is not "0")."""
    return _switch("DQT_DECODE_WORDS")


def decode_trits_enabled() -> bool:
    """The trit decode kernel takes base-3 blocks (``DQT_DECODE_TRITS`` is not "0")."""
    return _switch("DQT_DECODE_TRITS")


def _launch_options() -> dict:
    """Compiler options of every launch: no FMA contraction (the interpreter takes none)."""
    return {} if _INTERPRET else {"enable_fp_fusion": False}


def _lanes(spec) -> int:
    """Lanes (values) of a block's tile: the block size rounded up to a power of two, ≥ 16."""
    return max(16, triton.next_power_of_2(spec.block))


def _kb(spec) -> int:
    return triton.next_power_of_2(max(1, spec.code_bits))


def _warps(lanes: int) -> int:
    """encode: one program per block, ENCODE_VALUES_PER_THREAD values per thread (more values
    per thread amortise the per-block work: table, reductions, scale bytes)."""
    return max(1, min(8, lanes // (32 * ENCODE_VALUES_PER_THREAD)))


def encode(spec, x: Tensor, table: Tensor, msg: Tensor, residual: Tensor | None,
           grad_scale: float, key: int, bad: Tensor | None) -> None:
    nblocks = table.shape[0]
    if nblocks == 0:
        return
    lanes = _lanes(spec)
    nb3 = triton.next_power_of_2(-(-spec.block // 5))
    dummy = x
    encode_kernel[(nblocks,)](
        x, table, msg, residual if residual is not None else dummy,
        bad if bad is not None else table, float(grad_scale), f32_recip(grad_scale), int(key),
        KIND=CODES["kind"][spec.kind], STOCHASTIC=spec.stochastic, CODE_BITS=spec.code_bits,
        SCALE_FMT=CODES["scale"][spec.scale], SCALE_BYTES=SCALES[spec.scale],
        LEVELS=spec.levels, CLIP=float(spec.clip), LANES=lanes, NB3=nb3, KB=_kb(spec),
        HAS_RES=residual is not None,
        HAS_BAD=bad is not None, UNIT=float(grad_scale) == 1.0, num_warps=_warps(lanes),
        **_launch_options())


class _TableSplits:
    """Which rows of a table the word kernel takes, and the table split into those rows and
    the rest — computed once per table and kept outside it: keyed by the table's identity (an
    entry goes when its table does) and valid while the table's version counter, which every
    in-place write bumps, and the spec fields the rows depend on are unchanged."""

    def __init__(self) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def get(self, spec, table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(rows: bool mask on the table's device, the aligned rows, the other rows)."""
        tag = (table._version, spec.code_bits, spec.scale)
        entry = self._entries.get(table)
        if entry is not None and entry[0] == tag:
            return entry[1]
        t = table.cpu()
        ok = (t[:, DATA] % 4 == 0) & (t[:, LEN] % 4 == 0) & ((t[:, MSG] + t[:, CODE]) % 4 == 0)
        if spec.scale == "fp32":
            ok &= (t[:, MSG] + t[:, SCALE]) % 4 == 0
        elif spec.scale == "bf16":
            ok &= (t[:, MSG] + t[:, SCALE]) % 2 == 0
        rows = ok.to(table.device)
        split = (rows, table[rows].contiguous(), table[~rows].contiguous())
        self._entries[table] = (tag, split)
        return split


_SPLITS = _TableSplits()


def word_rows(spec, table: Tensor) -> Tensor:
    """Which rows of ``table`` the word kernel may decode (bool, on the table's device): data
    offset, length and code offset multiples of 4, the scale inside one 32-bit word. Computed
    once per table (recomputed if the table is written in place)."""
    return _SPLITS.get(spec, table)[0]


def decode_path(spec, msg: Tensor, peer_stride: int) -> str:
    """"words" where the word kernel can take aligned rows of this call, else "bytes"."""
    ok = (decode_words_enabled() and spec.code_bits in (1, 2, 4, 8)
          and _lanes(spec) >= WORDS_MIN_BLOCK and _lanes(spec) * spec.code_bits >= 32
          and peer_stride % 4 == 0 and msg.numel() % 4 == 0 and msg.data_ptr() % 4 == 0)
    return "words" if ok else "bytes"


def decode(spec, msg: Tensor, table: Tensor, out: Tensor, npeers: int, peer_stride: int,
           flag_off: int, mode: str) -> None:
    nblocks = table.shape[0]
    if nblocks == 0:
        return
    if decode_path(spec, msg, peer_stride) == "words":
        _, aligned, rest = _SPLITS.get(spec, table)
        if aligned.shape[0]:
            _decode_words(spec, msg, aligned, out, npeers, peer_stride, flag_off, mode)
        table = rest
        if table.shape[0] == 0:
            return
    _decode_bytes(spec, msg, table, out, npeers, peer_stride, flag_off, mode)


def _decode_words(spec, msg, table, out, npeers, peer_stride, flag_off, mode) -> None:
    lanes = _lanes(spec)
    nblocks = table.shape[0]
    bpp = max(1, min(WORDS_TILE // lanes, triton.next_power_of_2(nblocks)))
    decode_words_kernel[(triton.cdiv(nblocks, bpp),)](
        msg.view(torch.int32), table, out, nblocks, int(peer_stride), int(flag_off),
        f32_recip(npeers), NPEERS=int(npeers), KIND=CODES["kind"][spec.kind],
        CODE_BITS=spec.code_bits, SCALE_FMT=CODES["scale"][spec.scale],
        SCALE_BYTES=SCALES[spec.scale], LEVELS=spec.levels, LANES=lanes, BPP=bpp,
        MODE=CODES["mode"][mode], HAS_FLAG=flag_off >= 0,
        num_warps=max(1, min(WORDS_WARPS, bpp * lanes // 128)), **_launch_options())


_TRIT_TABLES: dict[torch.device, Tensor] = {}


def trit_table(device: torch.device) -> Tensor:
    """int32 (256,): entry b holds the five codes of base-3 byte b as 2-bit fields (code m at
    bits 2m, 2m+1), made from :func:`dqt.kernels.bitpack.unpack_base3` itself (every byte,
    the 13 that no encoder writes included), so the lookup decodes what the reference does.
    One per device, made on first use."""
    t = _TRIT_TABLES.get(device)
    if t is None:
        from dqt.kernels.bitpack import unpack_base3

        codes = unpack_base3(torch.arange(256, dtype=torch.uint8), 5 * 256).view(256, 5)
        t = (codes.to(torch.int32) << (2 * torch.arange(5, dtype=torch.int32))).sum(1)
        t = _TRIT_TABLES[device] = t.to(torch.int32).to(device)
    return t


def _decode_trits(spec, msg, table, out, npeers, peer_stride, flag_off, mode) -> None:
    nblocks = table.shape[0]
    nb = -(-spec.block // 5)  # code bytes of a full block
    nbc = min(TRITS_CHUNK, triton.next_power_of_2(nb))
    bpp = max(1, min(TRITS_TILE // nbc, triton.next_power_of_2(nblocks)))
    decode_trits_kernel[(triton.cdiv(nblocks, bpp),)](
        msg, trit_table(msg.device), table, out, nblocks, int(peer_stride), int(flag_off),
        f32_recip(npeers),
        NPEERS=int(npeers), SCALE_FMT=CODES["scale"][spec.scale], BPP=bpp, NBC=nbc,
        NCHUNK=-(-nb // nbc), MODE=CODES["mode"][mode], HAS_FLAG=flag_off >= 0,
        num_warps=max(1, min(DECODE_WARPS, bpp * nbc // 128)), **_launch_options())


def _decode_bytes(spec, msg, table, out, npeers, peer_stride, flag_off, mode) -> None:
    nblocks = table.shape[0]
    if spec.code_bits == 0 and decode_trits_enabled():
        _decode_trits(spec, msg, table, out, npeers, peer_stride, flag_off, mode)
        return
    lanes = _lanes(spec)
    nb3 = triton.next_power_of_2(-(-spec.block // 5))
    per_block = 8 * nb3 if spec.code_bits == 0 else lanes  # base-3: (NB3, 8) lanes a block
    bpp = max(1, min(DECODE_TILE // per_block, triton.next_power_of_2(nblocks)))
    decode_kernel[(triton.cdiv(nblocks, bpp),)](
        msg, table, out, nblocks, int(peer_stride), int(flag_off), f32_recip(npeers),
        NPEERS=int(npeers), KIND=CODES["kind"][spec.kind], CODE_BITS=spec.code_bits,
        SCALE_FMT=CODES["scale"][spec.scale], SCALE_BYTES=SCALES[spec.scale],
        LEVELS=spec.levels, LANES=lanes, NB3=nb3, BPP=bpp, MODE=CODES["mode"][mode],
        HAS_FLAG=flag_off >= 0,
        num_warps=max(1, min(DECODE_WARPS, bpp * per_block // 128)), **_launch_options())

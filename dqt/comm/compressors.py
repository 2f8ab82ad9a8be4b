"""dqt's gradient compressors: named, validated option sets over the block formats of
:mod:`dqt.kernels.blockq` (where the maths, the wire format and the kernels live).

=============== ============================================ ============================
``scheme.name`` method                                       per value on the wire
=============== ============================================ ============================
``onebit``      1-bit SGD (Seide, Fu, Droppo, Li, Yu,        1 bit + a 1-byte power-of-two
                Interspeech 2014): sign × mean|x| per block,  (e8m0) scale per block of 128
                error feedback on worker and server           (1.0625 bits)
``ef_signsgd``  EF-SignSGD (Karimireddy, Rebjock, Stich,      1 bit + an fp32 scale per
                Jaggi, ICML 2019): the same scaled sign,      block of 2048
                ‖x‖₁/d over blocks of 2048, error feedback
``signsgd``     signSGD with majority vote (Bernstein, Wang,  1 bit (+1 flag byte per
                Azizzadenesheli, Anandkumar, ICML 2018)       message)
``ternary_grad`` TernGrad (Wen, Xu, Yan, Wu, Wang, Chen, Li,  2 bits (``format=base3``:
                NeurIPS 2017): stochastic {−1,0,1}·max|x|,    1.6) + fp32 scale per 2048
                optional ±c·σ clipping
``qsgd``        QSGD (Alistarh, Grubic, Li, Tomioka,          ``bits`` + fp32 scale per
                Vojnovic, NeurIPS 2017): ``bits``-bit         2048
                stochastic rounding of |x|/‖x‖₂ with sign
=============== ============================================ ============================

Blocks never cross a parameter tensor (:mod:`dqt.comm.layout`); ``block_size`` is a maximum.
A :class:`Compressor` also encodes a lone 1-D tensor as one message (blocks of ``block_size``,
the last partial): what the tests and benchmarks use.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor

from dqt.kernels import blockq
from dqt.kernels.blockq import BlockSpec, linear_table
from dqt.kernels.philox import mix_seed
from dqt.registry import Registry

__all__ = ["COMPRESSORS", "Compressor", "build_compressor", "mix_seed"]


class Compressor:
    """A named :class:`BlockSpec`: ``biased`` schemes want error feedback, ``vote`` schemes
    reduce by majority vote instead of the mean."""

    name = "base"
    biased = True
    vote = False

    def __init__(self, spec: BlockSpec) -> None:
        self.spec = spec

    @property
    def block_size(self) -> int:
        return self.spec.block

    @property
    def stochastic(self) -> bool:
        return self.spec.stochastic

    def wire_nbytes(self, n: int) -> int:
        """Bytes of the message of a 1-D tensor of n values."""
        B = self.spec.block
        return self.spec.message_nbytes([min(B, n - s) for s in range(0, n, B)])

    def encode(self, x: Tensor, seed: int = 0, impl: str = "auto") -> Tensor:
        """fp32 (n,) → uint8 (wire_nbytes(n),); ``seed`` is the Philox key."""
        return self.encode_decode(x, seed, impl)[0]

    def encode_decode(self, x: Tensor, seed: int = 0, impl: str = "auto"
                      ) -> tuple[Tensor, Tensor]:
        """(message, what every receiver decodes from it)."""
        x = _input(x)
        table, nbytes = linear_table(self.spec, x.numel(), x.device)
        msg = torch.zeros(nbytes, dtype=torch.uint8, device=x.device)
        blockq.encode(self.spec, x, table, msg, key=seed, impl=impl)
        out = torch.empty_like(x)
        blockq.decode(self.spec, msg, table, out, impl=impl)
        return msg, out

    def decode(self, buf: Tensor, n: int, impl: str = "auto") -> Tensor:
        if buf.dim() != 1 or buf.dtype != torch.uint8:
            raise ValueError(f"decode takes a 1-D uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
        if buf.numel() != self.wire_nbytes(n):
            raise ValueError(f"{self.name}: message of {buf.numel()} bytes, "
                             f"{self.wire_nbytes(n)} expected for n={n}")
        table, _ = linear_table(self.spec, n, buf.device)
        out = torch.empty(n, dtype=torch.float32, device=buf.device)
        blockq.decode(self.spec, buf.contiguous(), table, out, impl=impl)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


def _input(x: Tensor) -> Tensor:
    if x.dim() != 1:
        raise ValueError(f"compressors take a 1-D tensor, got shape {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def _block_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        raise ValueError(f"scheme.block_size: must be a positive multiple of 8 (values per "
                         f"scale); got {value!r}")
    return value


def _scale_dtype(value: Any) -> str:
    if value not in ("fp32", "bf16", "e8m0"):
        raise ValueError(f"scheme.scale_dtype: must be 'fp32', 'bf16' or 'e8m0'; got {value!r}")
    return value


COMPRESSORS: Registry[Callable[..., Compressor]] = Registry("scheme.name")


@COMPRESSORS.register("onebit")
class OneBit(Compressor):
    """1-bit SGD: a = mean|x| per block (the L2-optimal scale of a·sign x), code x ≥ 0.

    Blocks of 128 with a 1-byte power-of-two scale (e8m0): 1.0625 bits per value, 30.1× fewer
    bytes than fp32. The block size is what decides accuracy (digits, 4 ranks, 3 seeds, bf16
    scales: blocks of 64 +0.55 pt vs all-reduce, 256 −1.30 pt, 1024 −8.2 pt); a coarser scale
    costs little because error feedback absorbs its rounding (128 with e8m0 ≈ 128 with bf16)."""

    name = "onebit"

    def __init__(self, *, block_size: int = 128, scale_dtype: str = "e8m0") -> None:
        super().__init__(BlockSpec("sign_mean", _block_size(block_size), 1,
                                   _scale_dtype(scale_dtype)))


@COMPRESSORS.register("ef_signsgd")
class EFSignSGD(OneBit):
    """EF-SignSGD's compressor ‖x‖₁/d·sign(x) per block of 2048 values of one tensor."""

    name = "ef_signsgd"

    def __init__(self, *, block_size: int = 2048, scale_dtype: str = "fp32") -> None:
        super().__init__(block_size=block_size, scale_dtype=scale_dtype)


@COMPRESSORS.register("signsgd")
class SignSGD(Compressor):
    """signSGD: bits only, decode ±1, averaged by majority vote. ``block_size`` only sets the
    kernel's block (there are no scales)."""

    name = "signsgd"
    vote = True

    def __init__(self, *, block_size: int = 2048) -> None:
        super().__init__(BlockSpec("sign", _block_size(block_size), 1, "none"))


@COMPRESSORS.register("ternary_grad")
class TernaryGrad(Compressor):
    """TernGrad: s = max|x| per block (after optional ±clip_sigma·σ clipping), codes t+1
    packed 2bit (4 per byte) or base3 (5 per byte). Unbiased without clipping."""

    name = "ternary_grad"

    def __init__(self, *, block_size: int = 2048, format: str = "2bit",
                 clip_sigma: float = 0.0) -> None:
        if format not in ("2bit", "base3"):
            raise ValueError(f"scheme.format: must be '2bit' or 'base3'; got {format!r}")
        if not clip_sigma >= 0:
            raise ValueError(f"scheme.clip_sigma: must be >= 0 (0 = off); got {clip_sigma!r}")
        self.format = format
        self.biased = clip_sigma > 0
        super().__init__(BlockSpec("ternary", _block_size(block_size),
                                   2 if format == "2bit" else 0, "fp32", clip=float(clip_sigma)))


@COMPRESSORS.register("qsgd")
class QSGD(Compressor):
    """QSGD: ν = ‖x‖₂ per block, level = stochastic rounding of |x|/ν·L, L = 2^(bits−1) − 1,
    code = 2·level + sign bit in ``bits`` bits. Unbiased."""

    name = "qsgd"
    biased = False

    def __init__(self, *, block_size: int = 2048, bits: int = 4) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"scheme.bits: must be an int in [2, 8]; got {bits!r}")
        self.bits = bits
        super().__init__(BlockSpec("qsgd", _block_size(block_size), bits, "fp32",
                                   levels=(1 << (bits - 1)) - 1))


def build_compressor(name: str, **options: Any) -> Compressor:
    """``COMPRESSORS.get(name)(**options)``; an option the scheme does not take is a
    ValueError naming ``scheme.<option>`` and listing the accepted ones."""
    cls = COMPRESSORS.get(name)
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"scheme.{unknown[0]}: not an option of compressor '{name}'; "
                         f"accepted: {', '.join(accepted) or '(none)'}")
    return cls(**options)

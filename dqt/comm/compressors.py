"""A codec on its own, outside a bucket: what tests and benchmarks encode and decode.

=============== ============================================ ============================
``scheme.name`` method (the config: :mod:`dqt.comm.config`)  per value on the wire
=============== ============================================ ============================
``onebit``      1-bit SGD: sign × mean|x| per block, error    1 bit + a 1-byte power-of-two
                feedback on worker and server;                (e8m0) scale per block of 128
                ``reconstruction=two_means``: the mean of     (``two_means``: two scales)
                the negative and of the non-negative values
``ef_signsgd``  EF-SignSGD: ‖x‖₁/d · sign(x) per block        1 bit + an fp32 scale per 2048
``signsgd``     signSGD with majority vote                    1 bit (+1 flag byte per msg)
``ternary_grad`` TernGrad: stochastic {−1,0,1}·max|x|         2 bits (``base3``: 1.6) + fp32
                                                              scale per 2048
``qsgd``        QSGD: ``bits``-bit stochastic rounding of     ``bits`` + fp32 scale per 2048
                |x|/‖x‖₂ with sign
=============== ============================================ ============================

The maths, the wire format and the kernels live in :mod:`dqt.kernels.blockq`; a scheme's
config (:mod:`dqt.comm.config`) builds the :class:`~dqt.kernels.blockq.BlockSpec`. A
:class:`Compressor` encodes a lone 1-D tensor as one message (blocks of ``block_size``, the
last partial); inside a bucket, blocks never cross a parameter tensor (:mod:`dqt.comm.layout`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dqt.comm.config import SCHEME_CONFIGS, CompressedConfig, compressed_config
from dqt.kernels import blockq
from dqt.kernels.blockq import linear_table
from dqt.kernels.philox import mix_seed

__all__ = ["COMPRESSORS", "Compressor", "build_compressor", "mix_seed"]

COMPRESSORS: tuple[str, ...] = tuple(sorted(
    n for n, c in SCHEME_CONFIGS.items() if issubclass(c, CompressedConfig)))
"""The names of dqt's codecs."""


class Compressor:
    """A codec's :class:`BlockSpec` with its flags: ``biased`` codecs want error feedback,
    ``vote`` codecs reduce by majority vote instead of the mean."""

    def __init__(self, cfg: CompressedConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.spec = cfg.block_spec()
        self.biased = cfg.biased
        self.vote = cfg.vote

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
        return f"Compressor({self.name}, {self.spec})"


def _input(x: Tensor) -> Tensor:
    if x.dim() != 1:
        raise ValueError(f"compressors take a 1-D tensor, got shape {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def build_compressor(name: str, **options: Any) -> Compressor:
    """The codec of ``+scheme=name`` with ``options`` (fields of its config); an unknown
    option is an error naming ``scheme.<option>`` and listing the accepted ones."""
    return Compressor(compressed_config(name, **options))

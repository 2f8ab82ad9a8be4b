"""How one DDP gradient bucket is cut into blocks, chunks and messages.

The bucket's parameters are taken in *parameter order* (the order of ``model.parameters()``),
not in DDP's bucket order, which changes after the first iteration: the layout of a bucket is
then a function of which parameters it holds, not of when their gradients became ready.

In that canonical order the bucket's n values are split into N chunks of c = ceil(n/N) values
(chunk r is owned by rank r). *Blocks* — the unit that carries one scale (see
:mod:`dqt.kernels.blockq`) — are cut at every parameter boundary, every chunk boundary and every
``block`` values from the start of each (parameter ∩ chunk) piece, so **a block never mixes two
tensors**: a scale is never shared by values of very different magnitude (a bias and a weight
matrix), which is what makes scaled sign with error feedback contract (Karimireddy et al. 2019).

Chunk r's message is ``[scales of its blocks][codes of block 0][codes of block 1]…`` padded
with zero bytes to M, the largest chunk message (+1 trailing flag byte for majority vote)
rounded up to a multiple of 4 bytes, so the collectives exchange equal-sized messages that
start on 32-bit words (what lets the GPU decode read codes a word at a time). Every rank
builds the same layout from the same parameters, so the offsets need not travel.

Tables (int64, one row per block, columns of :mod:`dqt.kernels.blockq`):

* ``all_blocks`` — every block: DATA = position in the bucket buffer, RES = position in the
  flat parameter-order residual, MSG = r·M;
* ``own_blocks`` — this rank's chunk: DATA = position in the owned chunk (length ``own_len``),
  same RES, MSG = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dqt.kernels.blockq import BlockSpec, table_from_rows


@dataclass(frozen=True)
class ParamSlot:
    """One parameter of a bucket: where it lives in the flat parameter-order buffer (``flat``),
    in the bucket buffer (``bucket``), and its number of values."""

    flat: int
    bucket: int
    numel: int


@dataclass
class BucketLayout:
    n: int
    chunks: int
    rank: int
    msg_nbytes: int  # M
    flag_off: int  # M − 1 with a flag byte, else −1
    chunk_len: list[int]
    own_len: int
    all_blocks: Tensor
    own_blocks: Tensor
    block_chunk: Tensor  # chunk of each row of all_blocks
    first_param: int  # flat offset of the bucket's first parameter (a stable bucket id)
    cache: dict = field(default_factory=dict)  # per-layout buffers of the collectives

    @property
    def nblocks(self) -> int:
        return self.all_blocks.shape[0]


def build_layout(slots: list[ParamSlot], chunks: int, rank: int, spec: BlockSpec,
                 flag: bool = False, device: torch.device | str = "cpu") -> BucketLayout:
    """The layout of a bucket holding ``slots`` (any order) for ``chunks`` owners; ``rank``
    owns chunk ``rank`` (with one chunk — the allgather collective — every rank owns it)."""
    if chunks == 1:
        rank = 0
    if not 0 <= rank < chunks:
        raise ValueError(f"rank {rank} does not own one of {chunks} chunks")
    slots = sorted(slots, key=lambda s: s.flat)
    n = sum(s.numel for s in slots)
    c = -(-n // chunks) if n else 0
    B = spec.block
    per_chunk: list[list[tuple[int, int, int, int]]] = [[] for _ in range(chunks)]
    pos = 0  # canonical position of the current parameter's first value
    for s in slots:
        start = 0
        while start < s.numel:
            r = (pos + start) // c
            piece_end = min(s.numel, (r + 1) * c - pos)  # this parameter ∩ chunk r
            for b0 in range(start, piece_end, B):
                ln = min(B, piece_end - b0)
                per_chunk[r].append((s.bucket + b0, s.flat + b0, ln, pos + b0 - r * c))
            start = piece_end
        pos += s.numel
    chunk_len = [max(0, min(c, n - r * c)) for r in range(chunks)]
    return _finish(per_chunk, chunk_len, rank, spec, flag, device, n,
                   first_param=slots[0].flat if slots else 0)


def shard_layout(shards: list[tuple[int, list[int]]], chunks: int, rank: int, spec: BlockSpec,
                 flag: bool = False, device: torch.device | str = "cpu") -> BucketLayout:
    """The layout of FSDP2's reduce-scatter input (:mod:`dqt.comm.fsdp`): ``chunks`` equal chunks
    (chunk r is rank r's shard), each the concatenation of every parameter's padded shard.
    ``shards[i] = (L, real)``: parameter i's padded shard is L values long in every chunk, of
    which ``real[r]`` (≤ L) are values of the parameter in chunk r; the rest is FSDP's zero
    padding, which no block covers (it is neither sent nor decoded). Blocks never cross a
    parameter. The residual lives in the same layout as the input (RES = DATA)."""
    S = sum(L for L, _ in shards)
    B = spec.block
    per_chunk: list[list[tuple[int, int, int, int]]] = [[] for _ in range(chunks)]
    for r in range(chunks):
        off = 0
        for L, real in shards:
            for b0 in range(0, real[r], B):
                pos = r * S + off + b0
                per_chunk[r].append((pos, pos, min(B, real[r] - b0), off + b0))
            off += L
    return _finish(per_chunk, [S] * chunks, rank, spec, flag, device, chunks * S, first_param=0)


def _finish(per_chunk: list[list[tuple[int, int, int, int]]], chunk_len: list[int], rank: int,
            spec: BlockSpec, flag: bool, device: torch.device | str, n: int,
            first_param: int) -> BucketLayout:
    """The tables and message size of blocks given per chunk as (DATA, RES, LEN, position in
    the chunk)."""
    chunks = len(per_chunk)
    sizes = [spec.message_nbytes([b[2] for b in blocks]) for blocks in per_chunk]
    # M: whole 32-bit words, so every peer's message starts word-aligned (the word decode)
    M = -(-(max(sizes) + (1 if flag else 0)) // 4) * 4 if sizes else 0
    all_rows, own_rows, chunk_of = [], [], []
    ctr = 0
    for r, blocks in enumerate(per_chunk):
        code = spec.scale_nbytes * len(blocks)
        for k, (data, res, ln, local) in enumerate(blocks):
            scale = k * spec.scale_nbytes
            all_rows.append((data, res, ln, r * M, scale, code, ctr))
            chunk_of.append(r)
            if r == rank:
                own_rows.append((local, res, ln, 0, scale, code, ctr))
            code += spec.code_nbytes(ln)
            ctr += 1
    return BucketLayout(n=n, chunks=chunks, rank=rank, msg_nbytes=M,
                        flag_off=M - 1 if flag else -1, chunk_len=chunk_len,
                        own_len=chunk_len[rank], all_blocks=table_from_rows(all_rows, device),
                        own_blocks=table_from_rows(own_rows, device),
                        block_chunk=torch.tensor(chunk_of, dtype=torch.int64, device=device),
                        first_param=first_param)

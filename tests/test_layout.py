"""dqt.comm.layout, property-based over random buckets (parameter sizes, bucket order, world
size, block size): blocks tile the bucket exactly once, never cross a parameter or a chunk,
chunk r's blocks tile the owned chunk, message areas never overlap and fit in M, and the layout
depends on which parameters the bucket holds, not on their order in DDP's bucket."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dqt.comm.layout import ParamSlot, build_layout
from dqt.kernels.blockq import CODE, CTR, DATA, LEN, MSG, RES, SCALE, BlockSpec

SPECS = [BlockSpec("sign_mean", 8, 1, "bf16"), BlockSpec("ternary", 16, 0, "fp32"),
         BlockSpec("qsgd", 24, 3, "fp32", levels=3), BlockSpec("sign", 8, 1, "none"),
         BlockSpec("sign_two", 16, 1, "e8m0")]  # two scales per block


def _bucket(sizes: list[int], perm: list[int], gap: int = 5) -> list[ParamSlot]:
    """Parameters at flat offsets with gaps (other buckets' parameters), in bucket order perm."""
    flat, f = [], 0
    for s in sizes:
        flat.append(f)
        f += s + gap
    slots, pos = [], 0
    for i in perm:
        slots.append(ParamSlot(flat[i], pos, sizes[i]))
        pos += sizes[i]
    return slots


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 70), min_size=1, max_size=6), world=st.integers(1, 4),
       spec_i=st.integers(0, len(SPECS) - 1), data=st.data())
def test_layout_properties(sizes, world, spec_i, data):
    spec = SPECS[spec_i]
    perm = data.draw(st.permutations(list(range(len(sizes)))))
    slots = _bucket(sizes, perm)
    n = sum(sizes)
    lays = [build_layout(slots, world, r, spec, flag=spec.kind == "sign") for r in range(world)]
    lay = lays[0]
    t = lay.all_blocks.tolist()
    # blocks tile the bucket buffer exactly once, each inside one parameter, at most B long
    seen = torch.zeros(n, dtype=torch.int64)
    by_bucket = {s.bucket: s for s in slots}
    for row in t:
        assert 1 <= row[LEN] <= spec.block
        seen[row[DATA]:row[DATA] + row[LEN]] += 1
        owner = max(b for b in by_bucket if b <= row[DATA])
        s = by_bucket[owner]
        assert row[DATA] + row[LEN] <= s.bucket + s.numel, "a block crosses a parameter"
        assert row[RES] - s.flat == row[DATA] - s.bucket, "residual offset != parameter offset"
    assert torch.all(seen == 1)
    assert [row[CTR] for row in t] == list(range(len(t)))
    # chunks: c = ceil(n/N) values each (the last may be shorter); messages fit in M
    c = -(-n // world)
    assert lay.chunk_len == [max(0, min(c, n - r * c)) for r in range(world)]
    M = lay.msg_nbytes
    for r in range(world):
        rows = [row for row in t if row[MSG] == r * M]
        used = torch.zeros(M, dtype=torch.int64)
        for row in rows:
            used[row[SCALE]:row[SCALE] + spec.scale_nbytes] += 1
            used[row[CODE]:row[CODE] + spec.code_nbytes(row[LEN])] += 1
        assert torch.all(used <= 1), "message areas overlap"
        if lay.flag_off >= 0:
            assert used[lay.flag_off] == 0
        # rank r's own table tiles its chunk and addresses the same blocks
        own = lays[r].own_blocks.tolist()
        assert lays[r].own_len == lay.chunk_len[r]
        cover = torch.zeros(lays[r].own_len, dtype=torch.int64)
        for o, row in zip(own, rows):
            cover[o[DATA]:o[DATA] + o[LEN]] += 1
            assert o[MSG] == 0
            assert [o[k] for k in (RES, LEN, SCALE, CODE, CTR)] == \
                [row[k] for k in (RES, LEN, SCALE, CODE, CTR)]
        assert len(own) == len(rows) and torch.all(cover == 1)
    # the same parameters in another bucket order: the same blocks, messages and counters
    other = build_layout(_bucket(sizes, list(reversed(perm))), world, 0, spec,
                         flag=spec.kind == "sign")
    cols = [RES, LEN, MSG, SCALE, CODE, CTR]
    assert torch.equal(other.all_blocks[:, cols], lay.all_blocks[:, cols])
    assert other.msg_nbytes == M


def test_blocks_never_mix_tensors_and_chunks_cut_at_c():
    spec = BlockSpec("sign_mean", 256, 1, "bf16")
    lay = build_layout(_bucket([300, 10, 600], [2, 1, 0], gap=0), 2, 0, spec)
    # canonical order: p0 (300) p1 (10) p2 (600); n = 910, c = 455
    lengths = lay.all_blocks[:, LEN].tolist()
    assert lengths == [256, 44, 10, 145, 256, 199]  # p0: 256+44 | p1 | p2 in chunk 0: 145 | chunk 1: 455
    assert lay.chunk_len == [455, 455]
    # chunk 0: 4 bf16 scales + codes = 67 bytes, rounded up to whole 32-bit words
    assert lay.msg_nbytes == 68 and lay.msg_nbytes >= 2 * 4 + (32 + 6 + 2 + 19)
    assert lay.flag_off == -1


def test_bad_rank():
    with pytest.raises(ValueError, match="does not own"):
        build_layout(_bucket([10], [0]), 2, 2, SPECS[0])

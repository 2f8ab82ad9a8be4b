"""The fused (compiled) CPU path produces the same bytes as the eager reference — stochastic
schemes included, given the same seed — and the same decoded values (invariant 2)."""

from __future__ import annotations

import pytest
import torch

from dqt.comm.compressors import build_compressor
from dqt.comm.fused import fuse

CASES = {"onebit": {}, "ternary_grad/base3": {"format": "base3"}, "qsgd/4": {"bits": 4}}


@pytest.mark.parametrize("variant", list(CASES))
def test_fused_bytes_equal_reference(variant):
    ref = build_compressor(variant.split("/")[0], **CASES[variant])
    fused = fuse(ref)
    for n in (100_003, 1 << 18):  # a partial last block, and an exact multiple
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        x[::97] = 0.0
        msg, dec = ref.encode_decode(x, seed=11)
        fmsg, fdec = fused.encode_decode(x, seed=11)
        assert torch.equal(msg, fmsg), "wire bytes differ"
        assert torch.equal(dec, fdec)
        assert torch.equal(fused.encode(x, seed=11), msg)
        assert torch.equal(fused.decode(msg, n), ref.decode(msg, n))

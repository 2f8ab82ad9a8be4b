"""dqt.kernels.philox: Philox4x32-10 against the known-answer vectors of Random123 (Salmon et al.
2011, ``kat_vectors``), the uniform layout the kernels share, and its statistics."""

from __future__ import annotations

import torch

from dqt.kernels.philox import philox4x32, uniforms

F = 0xFFFFFFFF
# (counter c0..c3, key k0, k1) -> outputs, from Random123's kat_vectors ("philox4x32 10")
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((F, F, F, F), (F, F), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def test_known_answers():
    for ctr, (k0, k1), expected in KAT:
        out = philox4x32(*(torch.tensor([c]) for c in ctr), key=(k1 << 32) | k0)
        assert [int(o) for o in out] == list(expected)


def test_uniforms_layout():
    """Row k, column j: output j % 4 of counter (j // 4, counters[k], 0, 0), as (r >> 8)·2⁻²⁴."""
    key = 0xDEADBEEF12345
    u = uniforms(key, torch.tensor([3, 9]), 8)
    for k, ctr in enumerate([3, 9]):
        for j in range(8):
            r = philox4x32(*(torch.tensor([v]) for v in (j // 4, ctr, 0, 0)), key=key)[j % 4]
            assert float(u[k, j]) == (int(r) >> 8) / 2**24


def test_uniforms_are_uniform():
    """4·10⁵ draws: mean within 5σ of ½ (σ = 1/√(12·N)), and every decile within 5σ of N/10."""
    u = uniforms(12345, torch.arange(100), 4000).flatten().double()
    n = u.numel()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 / (12 * n) ** 0.5
    counts = torch.histc(u, bins=10, min=0, max=1)
    sd = (n * 0.1 * 0.9) ** 0.5
    assert torch.all((counts - n / 10).abs() < 5 * sd)

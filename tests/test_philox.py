"""dqt.kernels.philox: Philox4x32-10 against the known-answer vectors of Random123 (Salmon et al.
2011, ``kat_vectors``), the uniform layout the kernels share, and its statistics."""

from __future__ import annotations

import pytest
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
    """Row k, column j: the 16-bit half (j % 8) // 4 of output j % 4 of counter
    (j // 8, counters[k], 0, 0), as (2·r₁₆ + 1)·2⁻¹⁷."""
    key = 0xDEADBEEF12345
    u = uniforms(key, torch.tensor([3, 9]), 24)
    for k, ctr in enumerate([3, 9]):
        for j in range(24):
            r = philox4x32(*(torch.tensor([v]) for v in (j // 8, ctr, 0, 0)), key=key)[j % 4]
            r16 = (int(r) >> (16 * ((j % 8) // 4))) & 0xFFFF
            assert float(u[k, j]) == (2 * r16 + 1) / 2**17
    with pytest.raises(ValueError, match="multiple of 8"):
        uniforms(key, torch.tensor([0]), 12)


def test_uniforms_are_the_cell_midpoints():
    """Every u is (2m + 1)·2⁻¹⁷ for an integer 0 ≤ m < 2¹⁶: never 0, never above 1 − 2⁻¹⁷."""
    u = uniforms(7, torch.arange(64), 4096).flatten().double()
    m = (u * 2**17 - 1) / 2
    assert torch.equal(m, m.round()) and float(m.min()) >= 0 and float(m.max()) <= 2**16 - 1
    assert float(u.min()) >= 2.0**-17 and float(u.max()) <= 1 - 2.0**-17


def test_uniforms_are_uniform():
    """4·10⁵ draws: mean within 5σ of ½ (σ = 1/√(12·N)), and every decile within 5σ of N/10."""
    u = uniforms(12345, torch.arange(100), 4000).flatten().double()
    n = u.numel()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 / (12 * n) ** 0.5
    counts = torch.histc(u, bins=10, min=0, max=1)
    sd = (n * 0.1 * 0.9) ** 0.5
    assert torch.all((counts - n / 10).abs() < 5 * sd)

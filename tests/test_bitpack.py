"""dqt.kernels.bitpack: golden bytes for every packer (written out by hand from the documented
formats), property-based round trips at arbitrary lengths, zero padding, sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dqt.kernels import bitpack as wire

U8 = torch.uint8


def u8(values) -> torch.Tensor:
    return torch.tensor(values, dtype=U8)


def _random_codes(n: int, high: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n,), generator=g, dtype=torch.int64).to(U8)


# ----------------------------------------------------------------------------- golden bytes
def test_pack_bits_golden():
    # value i -> byte i//8, bit i%8
    assert wire.pack_bits(u8([1, 0, 1, 1, 0, 0, 0, 0, 1])).tolist() == [0b00001101, 0b00000001]
    assert wire.pack_bits(u8([1] * 8)).tolist() == [0b11111111]
    assert wire.pack_bits(u8([0, 0, 0, 0, 0, 0, 0, 1, 0, 1])).tolist() == [0b10000000, 0b00000010]
    assert wire.pack_bits(u8([])).tolist() == []
    assert wire.unpack_bits(u8([0b00001101, 0b00000001]), 9).tolist() == [1, 0, 1, 1, 0, 0, 0, 0, 1]


def test_pack_2bit_golden():
    # value i -> byte i//4, bits 2(i%4)..2(i%4)+1
    assert wire.pack_2bit(u8([1, 2, 3, 0, 3])).tolist() == [0b00111001, 0b00000011]
    assert wire.pack_2bit(u8([0, 0, 0, 2])).tolist() == [0b10000000]
    assert wire.unpack_2bit(u8([0b00111001, 0b00000011]), 5).tolist() == [1, 2, 3, 0, 3]


def test_pack_base3_golden():
    # byte j = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4
    assert wire.pack_base3(u8([2, 2, 2, 2, 2])).tolist() == [242]
    assert wire.pack_base3(u8([1, 0, 2, 0, 1, 2, 1])).tolist() == [1 + 18 + 81, 2 + 3]
    assert wire.pack_base3(u8([0, 0, 0, 0, 0, 1])).tolist() == [0, 1]
    assert wire.unpack_base3(u8([100, 5]), 7).tolist() == [1, 0, 2, 0, 1, 2, 1]


def test_pack_kbit_golden():
    # 3-bit stream: 5=101, 3=011, 7=111 -> stream bits 1,0,1, 1,1,0, 1,1,1
    assert wire.pack_kbit(u8([5, 3, 7]), 3).tolist() == [0b11011101, 0b00000001]
    # 4-bit: low nibble first
    assert wire.pack_kbit(u8([0xA, 0x3, 0xF]), 4).tolist() == [0x3A, 0x0F]
    # 5-bit: 31, 1 -> bits 11111 10000 -> byte0 = 0b00111111, byte1 = 0b00000000
    assert wire.pack_kbit(u8([31, 1]), 5).tolist() == [0b00111111, 0b00000000]
    # 6-bit: 0b101010, 0b010101 -> stream 010101 101010 -> 0b01101010, 0b00000101
    assert wire.pack_kbit(u8([0b101010, 0b010101]), 6).tolist() == [0b01101010, 0b00000101]
    # 7-bit: 127, 0, 1 -> seven ones, seven zeros, then bit 14 set
    assert wire.pack_kbit(u8([127, 0, 1]), 7).tolist() == [0b01111111, 0b01000000, 0b00000000]
    assert wire.pack_kbit(u8([7, 200, 0]), 8).tolist() == [7, 200, 0]
    # k = 1, 2 are pack_bits and pack_2bit
    assert wire.pack_kbit(u8([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b00001101, 1]
    assert wire.pack_kbit(u8([1, 2, 3, 0, 3]), 2).tolist() == [0b00111001, 0b00000011]
    assert wire.unpack_kbit(u8([0b11011101, 0b00000001]), 3, 3).tolist() == [5, 3, 7]
    assert wire.unpack_kbit(u8([0b01111111, 0b01000000, 0]), 7, 3).tolist() == [127, 0, 1]


def test_sizes():
    for n in range(0, 50):
        assert wire.pack_bits(torch.zeros(n, dtype=U8)).numel() == wire.packed_nbytes(n, 1) == -(-n // 8)
        assert wire.pack_2bit(torch.zeros(n, dtype=U8)).numel() == -(-n // 4)
        assert wire.pack_base3(torch.zeros(n, dtype=U8)).numel() == wire.base3_nbytes(n) == -(-n // 5)
        for k in range(1, 9):
            assert wire.pack_kbit(torch.zeros(n, dtype=U8), k).numel() == -(-n * k // 8)


def test_bad_arguments():
    with pytest.raises(ValueError):
        wire.pack_kbit(u8([1]), 0)
    with pytest.raises(ValueError):
        wire.pack_kbit(u8([1]), 9)
    with pytest.raises(ValueError):
        wire.unpack_bits(u8([1]), 9)  # needs 2 bytes
    with pytest.raises(ValueError):
        wire.pack_bits(torch.zeros(2, 2, dtype=U8))


# ----------------------------------------------------------------------------- round trips
LENGTHS = st.integers(min_value=0, max_value=1000)
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
FAST = settings(max_examples=40, deadline=None)


@FAST
@given(n=LENGTHS, seed=SEEDS)
def test_bits_round_trip(n, seed):
    bits = _random_codes(n, 2, seed)
    buf = wire.pack_bits(bits)
    assert buf.dtype == U8 and buf.numel() == -(-n // 8)
    assert torch.equal(wire.unpack_bits(buf, n), bits)
    # padding bits are zero: the unpacked tail beyond n
    assert not wire.unpack_bits(buf, 8 * buf.numel())[n:].any()


@FAST
@given(n=LENGTHS, seed=SEEDS)
def test_2bit_round_trip(n, seed):
    codes = _random_codes(n, 4, seed)
    buf = wire.pack_2bit(codes)
    assert buf.numel() == -(-n // 4)
    assert torch.equal(wire.unpack_2bit(buf, n), codes)
    assert not wire.unpack_2bit(buf, 4 * buf.numel())[n:].any()


@FAST
@given(n=LENGTHS, seed=SEEDS)
def test_base3_round_trip(n, seed):
    trits = _random_codes(n, 3, seed)
    buf = wire.pack_base3(trits)
    assert buf.numel() == -(-n // 5)
    assert int(buf.max()) <= 242 if n else True
    assert torch.equal(wire.unpack_base3(buf, n), trits)
    assert not wire.unpack_base3(buf, 5 * buf.numel())[n:].any()


@settings(max_examples=80, deadline=None)
@given(n=LENGTHS, k=st.integers(min_value=1, max_value=8), seed=SEEDS)
def test_kbit_round_trip(n, k, seed):
    codes = _random_codes(n, 2**k, seed)
    buf = wire.pack_kbit(codes, k)
    assert buf.numel() == -(-n * k // 8)
    assert torch.equal(wire.unpack_kbit(buf, k, n), codes)
    # padding bits are zero
    assert not wire.unpack_bits(buf, 8 * buf.numel())[n * k:].any()


@pytest.mark.parametrize("k", range(1, 9))
def test_kbit_is_the_bit_stream(k):
    """Every k against the definition: stream bit i·k+j is bit j of value i."""
    n = 37
    codes = _random_codes(n, 2**k, k)
    stream = ((codes.long()[:, None] >> torch.arange(k)) & 1).reshape(-1).to(U8)
    assert torch.equal(wire.pack_kbit(codes, k), wire.pack_bits(stream))


def test_fixed_width_agree_with_kbit():
    codes = _random_codes(999, 4, 3)
    assert torch.equal(wire.pack_kbit(codes, 2), wire.pack_2bit(codes))
    bits = _random_codes(999, 2, 4)
    assert torch.equal(wire.pack_kbit(bits, 1), wire.pack_bits(bits))


def test_every_base3_byte():
    """All 243 byte values decode to their base-3 digits and pack back."""
    buf = torch.arange(243, dtype=U8)
    trits = wire.unpack_base3(buf, 5 * 243).view(243, 5).long()
    assert torch.equal((trits * torch.tensor([1, 3, 9, 27, 81])).sum(1), torch.arange(243))
    assert torch.equal(wire.pack_base3(trits.reshape(-1).to(U8)), buf)


def test_accepts_other_integer_dtypes():
    assert wire.pack_bits(torch.tensor([True, False, True])).tolist() == [0b101]
    assert wire.pack_2bit(torch.tensor([3, 1], dtype=torch.int64)).tolist() == [0b0111]

"""dqt.kernels.lowbit_pack / lowbit_gemm: codes round-trip exactly through the packed layout
(golden words and random round trips), and the Triton GEMV/GEMM (the interpreter on CPU, the
GPU when there is one) matches the fp32 dequantize-then-matmul reference within a tolerance
that grows with √K, for 1-bit, ternary, 2-bit, 4-bit and 8-bit weights, batch 1 to 33."""

from __future__ import annotations

import math

import pytest
import torch

from dqt.kernels import lowbit_gemm_triton
from dqt.kernels.lowbit_gemm import LowBitWeight, lowbit_linear, lowbit_linear_ref
from dqt.kernels.lowbit_pack import dequantize_weight, pack_weight, unpack_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not lowbit_gemm_triton.available(torch.device(DEVICE)),
                                reason="needs triton (GPU, or the interpreter on CPU)")

# weight formats: name -> (bits, zero point, code range)
FORMATS = {"binary": (1, 0.5, 2), "ternary": (2, 1.0, 3), "int2": (2, 2.0, 4),
           "int4": (4, 8.0, 16), "uint8": (8, 128.0, 256)}


def _weight(fmt: str, n: int, k: int, seed: int) -> LowBitWeight:
    bits, zero, high = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, high, (n, k), generator=g).to(torch.uint8)
    scale = torch.rand(n, generator=g) * 0.1 + 0.01
    return LowBitWeight.from_codes(codes, scale, torch.full((n,), zero), bits)


def test_pack_golden_words():
    # 1-bit: codes of k = 0..31 in bits 0..31 of word 0; k = 32 in word 1
    codes = torch.zeros(2, 33, dtype=torch.uint8)
    codes[0, [0, 2, 3, 31]] = 1
    codes[0, 32] = 1
    codes[1, 1] = 1
    p = pack_weight(codes, 1)
    assert p.shape == (2, 2) and p.dtype == torch.int32
    assert p[:, 0].tolist() == [1 + 4 + 8 - 2**31, 1] and p[:, 1].tolist() == [2, 0]
    # 2-bit ternary codes t+1, 16 per word: value k at bits 2k, 2k+1
    t = torch.tensor([[2, 0, 1, 2] + [1] * 12], dtype=torch.uint8)
    assert pack_weight(t, 2).tolist() == [[2 + (0 << 2) + (1 << 4) + (2 << 6) + sum(1 << 2 * i for i in range(4, 16))]]
    # 4-bit, 8 per word
    assert pack_weight(torch.tensor([[1, 2, 3, 15, 0, 0, 0, 0, 9]], dtype=torch.uint8), 4).tolist() \
        == [[0x0000F321], [9]]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100])
def test_pack_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (7, k), generator=torch.Generator().manual_seed(k))
    codes = codes.to(torch.uint8)
    assert torch.equal(unpack_weight(pack_weight(codes, bits), bits, k), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"codes must be in \[0, 4\)"):
        pack_weight(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_weight(torch.zeros(1, 1, dtype=torch.uint8), 3)


def test_dequantize_formula():
    w = _weight("ternary", 3, 20, 0)
    codes = unpack_weight(w.packed, 2, 20).float()
    assert torch.equal(w.dequantize(), w.scale[:, None] * (codes - 1.0))
    assert set(codes.unique().tolist()) <= {0.0, 1.0, 2.0}
    assert torch.equal(dequantize_weight(w.packed, w.scale, w.zero, 2, 20), w.dequantize())


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 3, 8, 16, 33])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gemm_matches_reference(fmt, m, dtype):
    n, k = 48, 200  # not multiples of the tiles or of 32/bits
    w = _weight(fmt, n, k, seed=m).to(DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    y = lowbit_linear(x, w, impl="triton")
    ref = lowbit_linear_ref(x.float(), w)  # fp32 maths on the same (rounded) activations
    assert y.dtype == dtype and y.shape == (m, n)
    # fp32 accumulation error ~ √K·ε32·‖x‖‖w‖; the output rounds once to dtype
    eps = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    mag = (x.float().abs() @ w.dequantize().abs().t()).clamp_min(1e-3)
    tol = mag * (math.sqrt(k) * 2**-22 + eps)
    if dtype == torch.float32 and DEVICE == "cuda":
        tol = tol * 4  # ieee dot on GPU: another summation order
    assert torch.all((y.float() - ref).abs() <= tol), float(((y.float() - ref).abs() / tol).max())


def test_lowbit_linear_batched_and_bias():
    w = _weight("int4", 20, 64, 5).to(DEVICE)
    x = torch.randn(2, 3, 64).to(DEVICE)
    b = torch.randn(20).to(DEVICE)
    y = lowbit_linear(x, w, b, impl="triton")
    torch.testing.assert_close(y, lowbit_linear_ref(x, w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="K=64"):
        lowbit_linear(torch.randn(2, 63).to(DEVICE), w)


@pytest.mark.parametrize("fmt", ["binary", "ternary", "int4"])
def test_every_gemv_tile_config_is_correct(fmt):
    """The autotuner may pick any GEMV configuration (incl. split-K, reduced by the last slice of each tile)."""
    w = _weight(fmt, 40, 300, 3).to(DEVICE)
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = lowbit_linear_ref(x, w)
    for cfg in lowbit_gemm_triton._GEMV_CONFIGS:
        y = torch.empty(3, 40, device=DEVICE)
        lowbit_gemm_triton._launch(x, w, y, cfg)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4, msg=str(cfg))

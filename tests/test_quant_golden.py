"""Every registered quantizer against an independent numpy re-derivation of its published
formula (float64), plus the seed's three functions verbatim. Elements within 1e-4 of a rounding
boundary are left out of the comparison (fp32 vs fp64 may legitimately round them differently);
each case asserts that almost all elements are compared.

A quantizer registered without golden cases (``tests/cases.py``) fails
``test_every_quantizer_has_golden_cases``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dqt.quant import QUANTIZERS
from dqt.quant.methods.dorefa import dorefa_grad
from dqt.quant.methods.fixed_point import linear_quantize
from dqt.quant.methods.log_quant import log_linear_quantize
from dqt.quant.methods.tanh_quant import tanh_quantize
from tests.cases import GOLDEN, RNG, S
from tests.cases import GOLDEN_ELSEWHERE as SPECIAL
from tests.quant_refs import np_bwn, np_fg, np_linear, np_log_linear, np_sign

CASES = [pytest.param(name, kind, args, x, ref, id=f"{name}-{cid}")
         for name, cases in GOLDEN.items() for cid, kind, args, x, ref in cases]


def test_every_quantizer_has_golden_cases():
    missing = [n for n in QUANTIZERS.names() if n not in GOLDEN]
    assert not missing, f"registered quantizers without golden cases: {missing}"
    for n in QUANTIZERS.names():
        assert GOLDEN[n] or n in SPECIAL, n


def make(name, kind, args):
    q = QUANTIZERS.get(name)(kind, **args)
    return q.eval()  # no stats recording; per-batch ranges where there is no state yet


@pytest.mark.parametrize("name,kind,args,x,ref", CASES)
def test_golden(name, kind, args, x, ref):
    q = make(name, kind, args)
    xt = torch.from_numpy(x.copy())
    with torch.no_grad():
        q.init_from(xt) if kind == "weight" else None
        y = q(xt).numpy().astype(np.float64)
    expected, ok = ref(x)
    assert ok.mean() > 0.9, f"only {ok.mean():.2f} of the elements are compared"
    tol = 1e-5 * max(1.0, float(np.abs(expected[ok]).max()))
    np.testing.assert_allclose(y[ok], expected[ok], rtol=1e-5, atol=tol)
    assert not np.array_equal(y, x.astype(np.float64)), "the quantizer changed nothing"


def test_minifloat_e5m10_is_ieee_half():
    x = (RNG.standard_normal(4000) * np.exp(RNG.uniform(-12, 10, 4000))).astype(np.float32)
    x = x[np.abs(x) < 60000]
    q = make("minifloat", "act", {"exp_bits": 5, "mant_bits": 10})
    y = q(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    assert float(q(torch.tensor([1e6]))) == 65504.0  # saturates instead of inf


@pytest.mark.parametrize("e,m,dtype,top", [(4, 3, torch.float8_e4m3fn, 448.0),
                                            (5, 2, torch.float8_e5m2, 57344.0)])
def test_minifloat_ocp_is_torch_float8_bit_for_bit(e, m, dtype, top):
    """format=ocp against PyTorch's float8 dtypes: every finite code maps to itself, the
    midpoints between neighbours round to even as torch does, random values of every magnitude
    agree, and the exported codes are torch's bytes; beyond ±max it saturates (torch's cast
    gives NaN or inf there)."""
    q = make("minifloat", "weight", {"exp_bits": e, "mant_bits": m, "format": "ocp"})
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    noise = torch.from_numpy((RNG.standard_normal(20000) * np.exp(RNG.uniform(-12, 12, 20000)))
                             .astype(np.float32)).clamp(-top, top)
    x = torch.cat([grid, mids, noise])
    y = q(x)
    assert torch.equal(y, x.to(dtype).float())
    codes = q.encode(x[:len(x) // 4 * 4].reshape(4, -1)).codes.reshape(-1).to(torch.int64)
    assert torch.equal((codes & 0xFF).to(torch.uint8), x[:len(codes)].to(dtype).view(torch.uint8))
    assert float(q(torch.tensor([1e9]))) == top and grid.max() == top
    assert make("minifloat", "weight", {"exp_bits": e, "mant_bits": m}).top == \
        (240.0 if e == 4 else 57344.0)  # the IEEE-style layout reserves e4m3's top exponent


# ------------------------------------------------------------------ the seed, verbatim
def test_seed_linear_quantize_verbatim():
    x = torch.from_numpy(S)
    np.testing.assert_allclose(linear_quantize(x, 3, 6).numpy(), np_linear(S, 3, 6)[0], atol=1e-6)
    # the 1-bit branch as written in the seed: sign(x) − 1
    assert linear_quantize(torch.tensor([-2.0, 0.0, 3.0]), 0, 1).tolist() == [-2.0, -1.0, 0.0]


def test_seed_log_linear_quantize_verbatim():
    x = torch.from_numpy(S)
    y = log_linear_quantize(x, 2, 5).numpy()
    np.testing.assert_allclose(y, np_log_linear(S, 2, 5)[0], rtol=1e-5)
    assert log_linear_quantize(torch.tensor([-2.0, 3.0]), 0, 1).tolist() == [-1.0, 1.0]


def test_seed_tanh_quantize_verbatim_has_infinite_outer_levels():
    y = tanh_quantize(torch.tensor([-5.0, 0.3, 5.0]), 3)
    assert y[0] == -math.inf and y[2] == math.inf
    n = 7
    v = 2 * (math.floor((math.tanh(0.3) + 1) / 2 * n + 0.5) / n) - 1
    assert float(y[1]) == pytest.approx(math.atanh(v), rel=1e-6)
    # the registered quantizer decodes them at atanh(±(1 − 1/n)) instead
    q = make("tanh", "act", {"bits": 3})
    assert float(q(torch.tensor([5.0]))) == pytest.approx(math.atanh(1 - 1 / n), rel=1e-6)


# ------------------------------------------------------------------ need a layer / backward
def test_xnor_linear_and_conv_golden():
    from dqt.quant.prepare import prepare
    from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig

    torch.manual_seed(0)
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="bwn"),
                                                      act=QuantizerConfig(name="xnor")),
                    keep_first_last=False)
    lin, conv = nn.Linear(24, 5), nn.Conv2d(3, 4, 3, stride=2, padding=1)
    m = prepare(nn.ModuleDict({"lin": lin, "conv": conv}), cfg)
    x = torch.from_numpy(S)
    wl, bl = lin.parametrizations.weight.original.detach().numpy(), lin.bias.detach().numpy()
    beta = np.abs(S).mean(axis=1, keepdims=True)
    ref = (np_sign(S) @ np_bwn(wl)[0].T) * beta + bl
    np.testing.assert_allclose(m["lin"](x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)

    xi = RNG.standard_normal((2, 3, 7, 7)).astype(np.float32)
    wc = conv.parametrizations.weight.original.detach().numpy()
    bc = conv.bias.detach().numpy()
    wb = np.abs(wc).reshape(4, -1).mean(1)[:, None, None, None] * np_sign(wc)
    xp = np.pad(xi, ((0, 0), (0, 0), (1, 1), (1, 1)))
    a = np.abs(xp).mean(axis=1)  # A = mean_c |I| (zero padding)
    out = np.zeros((2, 4, 4, 4))
    # torch pads sign(I) with zeros (sign is applied before the conv's own zero padding)
    sign_i = np_sign(xi)
    sp = np.pad(sign_i, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(4):
        for j in range(4):
            k = a[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].mean(axis=(1, 2))
            out[:, :, i, j] = np.einsum("bchw,ochw->bo", sp[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3],
                                        wb) * k[:, None] + bc
    y = m["conv"](torch.from_numpy(xi)).detach().numpy()
    np.testing.assert_allclose(y, out, rtol=1e-5, atol=1e-5)


def test_dorefa_g_golden():
    g = (RNG.standard_normal((4, 3, 5)) * 1e-3).astype(np.float32)
    u = RNG.uniform(size=g.shape).astype(np.float32)
    y = dorefa_grad(torch.from_numpy(g), 4, torch.from_numpy(u)).numpy()
    expected, ok = np_fg(g, 4, u)
    assert ok.mean() > 0.95
    np.testing.assert_allclose(y[ok], expected[ok], rtol=1e-5, atol=1e-9)
    # the registered quantizer: identity forward, fg on the backward with torch's uniforms
    q = make("dorefa_g", "grad", {"bits": 4})
    x = torch.randn(4, 3, 5, requires_grad=True)
    out = q(x)
    assert torch.equal(out, x)
    torch.manual_seed(7)
    out.backward(torch.from_numpy(g))
    torch.manual_seed(7)
    u2 = torch.rand(4, 3, 5).numpy()
    expected2, ok2 = np_fg(g, 4, u2)
    np.testing.assert_allclose(x.grad.numpy()[ok2], expected2[ok2], rtol=1e-5, atol=1e-9)


def test_stochastic_binarization_has_hard_sigmoid_probability():
    torch.manual_seed(0)
    q = QUANTIZERS.get("bnn_sign")("act", stochastic=True).train()
    x = torch.tensor([-1.5, -0.5, 0.0, 0.4, 2.0]).repeat(20000, 1)
    p_plus = (q(x) > 0).float().mean(0)
    expected = np.clip((np.array([-1.5, -0.5, 0.0, 0.4, 2.0]) + 1) / 2, 0, 1)
    np.testing.assert_allclose(p_plus.numpy(), expected, atol=0.015)
    assert torch.equal(q.eval()(x[:1]), torch.tensor([[-1.0, -1.0, 1.0, 1.0, 1.0]]))

"""Integer-only inference (dqt.quant.export.integer_inference): the fixed-point primitives against
exact rational rounding, every output byte against an int64 numpy reference of the gemmlowp
formulas, agreement with the fake-quant model, and the refusals."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from dqt.quant import apply_qat, preset, qat_step
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant.export.integer_inference import (INT32_MAX, INT32_MIN, IntegerLayer,
                                                integer_layers, multiply_by_quantized_multiplier,
                                                quantize_multiplier, rounding_divide_by_pot,
                                                srdhm, to_integer)
from dqt.train.models import MLP, LeNetCNN

EDGES = [INT32_MIN, INT32_MIN + 1, -(2 ** 30), -3, -2, -1, 0, 1, 2, 3, 2 ** 30, INT32_MAX - 1,
         INT32_MAX]


# ------------------------------------------------------------------ fixed point, exactly
def _round_half_up(f: Fraction) -> int:
    return (f + Fraction(1, 2)).__floor__()


def _round_half_away(f: Fraction) -> int:
    r = (abs(f) + Fraction(1, 2)).__floor__()
    return r if f >= 0 else -r


def test_srdhm_is_round_half_up_of_ab_over_2_31_and_saturates():
    rng = random.Random(0)
    pairs = [(a, b) for a in EDGES for b in EDGES]
    pairs += [(rng.randint(INT32_MIN, INT32_MAX), rng.randint(INT32_MIN, INT32_MAX))
              for _ in range(3000)]
    # exact ties: a·b = (2j + 1)·2^30, both signs
    pairs += [(s * (2 * j + 1), 2 ** 30) for j in range(0, 2000, 7) for s in (1, -1)]
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    got = srdhm(a, b).tolist()
    for (x, y), g in zip(pairs, got):
        want = INT32_MAX if x == y == INT32_MIN else _round_half_up(Fraction(x * y, 2 ** 31))
        assert g == want, (x, y, g, want)
    assert srdhm(torch.tensor(INT32_MIN), torch.tensor(INT32_MIN)).item() == INT32_MAX
    # ties: +0.5 → 1, −0.5 → 0, −1.5 → −1 (gemmlowp's nudge rounds ties toward +∞)
    assert srdhm(torch.tensor([1, -1, -3]), torch.tensor(2 ** 30)).tolist() == [1, 0, -1]


def test_rounding_divide_by_pot_is_round_half_away_from_zero():
    rng = random.Random(1)
    xs, es = [], []
    for e in range(0, 32):
        cases = EDGES + [rng.randint(INT32_MIN, INT32_MAX) for _ in range(60)]
        if e:
            cases += [s * (2 * j + 1) * 2 ** (e - 1) for j in range(5) for s in (1, -1)]  # ties
        cases = [c for c in cases if INT32_MIN <= c <= INT32_MAX]
        xs += cases
        es += [e] * len(cases)
    got = rounding_divide_by_pot(torch.tensor(xs), torch.tensor(es)).tolist()
    for x, e, g in zip(xs, es, got):
        assert g == _round_half_away(Fraction(x, 2 ** e)), (x, e, g)
    assert rounding_divide_by_pot(torch.tensor([3, -3, 5, -5]), torch.tensor(1)).tolist() == \
        [2, -2, 3, -3]


def test_quantize_multiplier_is_within_half_an_ulp_of_m0():
    rng = random.Random(2)
    ms = [1.0, 0.5, 0.25, 2.0 ** -20, 1 - 2 ** -40, 0.75, 3.0, 2 ** 31 - 1.0] + \
        [10 ** rng.uniform(-8, 1) for _ in range(2000)]
    for m in ms:
        m0, shift = quantize_multiplier(m)
        assert 2 ** 30 <= m0 < 2 ** 31, m
        exact, got = Fraction(m), Fraction(m0) * Fraction(2) ** (shift - 31)
        assert abs(got - exact) <= Fraction(2) ** (shift - 32), m
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="multiplier"):
            quantize_multiplier(bad)


def test_multiply_by_quantized_multiplier_is_the_rounded_product():
    """x·M with M = M0·2^(shift−31): at most the two roundings' half steps from x·M exactly."""
    rng = random.Random(3)
    for _ in range(300):
        m = 10 ** rng.uniform(-6, 0.9)
        m0, shift = quantize_multiplier(m)
        x = rng.randint(-(2 ** 24), 2 ** 24)
        got = multiply_by_quantized_multiplier(torch.tensor(x), torch.tensor(m0),
                                               torch.tensor(shift)).item()
        exact = Fraction(x) * Fraction(m0) * Fraction(2) ** (shift - 31)
        assert abs(got - exact) <= 1, (x, m, got, float(exact))


# ------------------------------------------------------------------ models
def _digits(n: int = 600) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:n], dtype=torch.float32) / 16
    return (x - x.mean()) / x.std()


def _calibrated(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A random-init model with w8a8-style quantizers, EMA ranges calibrated on digits."""
    torch.manual_seed(0)
    x = _digits()
    if kind.startswith("mlp"):
        model = MLP(64, [256, 256], 10)
    else:
        model, x = LeNetCNN((1, 8, 8), [32, 64], 128, 10, batch_norm=kind == "cnn_bn"), \
            x.reshape(-1, 1, 8, 8)
    cfg = preset("w8a8")
    if kind != "cnn":  # the preset as shipped: first and last layer fp32
        act = QuantizerConfig(name="int" if kind == "mlp_int8" else "uint", bits=8)
        cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="int", bits=8),
                                                         act=act),
                        keep_first_last=False, fold_bn=True)
    model = apply_qat(cfg, model).train()
    for i in range(0, len(x), 100):  # records ranges (and BN statistics); needs grad mode
        model(x[i:i + 100])
        qat_step(model)
    return model.eval(), x


KINDS = ["mlp", "mlp_int8", "cnn", "cnn_bn"]


def _capture(modules: dict[str, nn.Module], inputs: bool = True) -> tuple[dict, list]:
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in modules.items():
        if inputs:
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, name=name: seen.__setitem__(name, a[0].detach().clone())))
        else:
            handles.append(m.register_forward_hook(
                lambda mod, a, out, name=name: seen.__setitem__(name, out.detach().clone())))
    return seen, handles


# ------------------------------------------------------------------ the int64 numpy reference
def _np_srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = a.astype(np.int64) * b.astype(np.int64)
    num = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    q = np.abs(num) // (1 << 31) * np.sign(num)  # C division: truncation toward zero
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, q)


def _np_rdbp(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    mask = (np.int64(1) << e) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> e) + ((x & mask) > threshold)


def _np_layer(q_in: np.ndarray, lay: IntegerLayer) -> np.ndarray:
    """acc = Σ(q − Z)·q_w + q_b in int64 (conv: an explicit im2col loop over the taps)."""
    w = lay.weight_t.numpy().astype(np.int64).T  # (N, K)
    x = q_in.astype(np.int64) - lay.z_in
    if lay.conv:
        (kh, kw), (ph, pw) = lay.kernel, lay.padding
        b, c, h, wd = x.shape
        xp = np.zeros((b, c, h + 2 * ph, wd + 2 * pw), np.int64)  # real 0 is code Z: 0 after −Z
        xp[:, :, ph:ph + h, pw:pw + wd] = x
        oh, ow = h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1
        wk = w.reshape(-1, kh, kw, c)  # the layer's K order: (kh, kw, C)
        acc = np.zeros((b, wk.shape[0], oh, ow), np.int64)
        for i in range(kh):
            for j in range(kw):
                acc += np.einsum("bchw,nc->bnhw", xp[:, :, i:i + oh, j:j + ow], wk[:, i, j, :])
        return acc + lay.bias.numpy().astype(np.int64)[None, :, None, None]
    return x @ w.T + lay.bias.numpy().astype(np.int64)


def _np_requantize(acc: np.ndarray, lay: IntegerLayer, relu: bool) -> np.ndarray:
    shape = (1, -1, 1, 1) if acc.ndim == 4 else (1, -1)
    m0, shift = lay.m0.numpy().reshape(shape), lay.shift.numpy().reshape(shape)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    x = np.clip(acc << left, INT32_MIN, INT32_MAX)
    y = _np_rdbp(_np_srdhm(x, m0), right) + lay.z_out
    lo, hi = (-127, 127) if lay.out_dtype == torch.int8 else (0, 255)
    y = np.clip(y, lo, hi)
    return np.maximum(y, lay.z_out) if relu else y


def _np_pool(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    return x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_integer_path_equals_the_int64_reference_byte_for_byte(kind):
    model, x = _calibrated(kind)
    gm = to_integer(model)
    lays = integer_layers(gm)
    ins, h1 = _capture(lays)
    outs, h2 = _capture(lays, inputs=False)
    with torch.no_grad():
        y = gm(x)
    for h in h1 + h2:
        h.remove()
    names = list(lays)
    q = ins[names[0]]
    if q.is_floating_point():
        q = lays[names[0]].quantize_input(q)
    q = q.numpy()
    for i, name in enumerate(names):
        lay = lays[name]
        acc = _np_layer(q, lay)
        if not lay.out_codes:
            ref = torch.from_numpy(acc).float() * lay.acc_scale.reshape(
                (1, -1, 1, 1) if acc.ndim == 4 else (1, -1))
            assert torch.equal(outs[name], ref), name
            break
        out = _np_requantize(acc, lay, relu=True)  # every layer here is followed by a ReLU
        assert outs[name].dtype == lay.out_dtype
        assert torch.equal(outs[name], torch.from_numpy(out).to(lay.out_dtype)), name
        if lay.conv:
            out = _np_pool(out)
        q = out.reshape(out.shape[0], -1) if not lays[names[i + 1]].conv else out
        assert torch.equal(ins[names[i + 1]], torch.from_numpy(q).to(lay.out_dtype)), name
    if kind == "cnn":  # the last layer is fp32; the integer chain ends at classifier.0
        assert names == ["features.3", "classifier.0"]
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], 10)


@pytest.mark.parametrize("kind", KINDS)
def test_integer_parameters_are_the_quantizers(kind):
    """Weight codes = the export's int8 codes, bias = round(b/(S_a·S_w)), M0·2^(shift−31) within
    2^−31 (relative) of S_a·S_w/S_out computed exactly from the fp32 scales."""
    from dqt.quant.bn_fold import FoldScale, folded_bias
    from dqt.quant.export.convert import _quantizer_input
    from dqt.quant.prepare import weight_quantizer

    model, _ = _calibrated(kind)
    lays = integer_layers(to_integer(model))
    names = list(lays)
    for i, name in enumerate(names):
        layer, lay = model.get_submodule(name), lays[name]
        w, _ = _quantizer_input(layer)
        enc = weight_quantizer(layer).encode(w.detach().float())
        codes = enc.codes.long() - 128
        if lay.conv:  # the layer orders K as (kh, kw, C)
            codes = codes.reshape(w.shape).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        assert torch.equal(lay.weight_t.t().long(), codes), name
        fold = layer.parametrizations.weight[0]
        b = folded_bias(layer, fold.bn) if isinstance(fold, FoldScale) else layer.bias.detach()
        for n in range(0, b.numel(), 7):
            s = Fraction(lay.s_in) * Fraction(float(enc.scale[n]))
            # float64 division: within 10^-6 of round-to-nearest's half step
            err = abs(Fraction(float(b[n])) / s - lay.bias[n].item())
            assert err <= Fraction(1, 2) + Fraction(1, 10 ** 6), (name, n)
            if lay.out_codes:
                m = s / Fraction(lays[names[i + 1]].s_in)
                got = Fraction(lay.m0[n].item()) * Fraction(2) ** (lay.shift[n].item() - 31)
                assert abs(got / m - 1) <= Fraction(1, 2 ** 30), (name, n)


def test_the_layers_requantization_is_multiply_by_quantized_multiplier():
    """IntegerLayer.requantize_acc (the in-place fast path) against the reference primitives,
    over the whole int32 range and multipliers with right shifts, none (M ∈ [1/2, 1)) and left
    shifts (M ≥ 1, saturating)."""
    model, _ = _calibrated("mlp")
    lay = integer_layers(to_integer(model))["net.2"]
    gen = torch.Generator().manual_seed(4)
    acc = torch.randint(INT32_MIN, INT32_MAX, (64, lay.weight_t.shape[1]), generator=gen)
    acc[0, :len(EDGES)] = torch.tensor(EDGES)
    for factor in (1e-7, 1e-3, 0.3, 0.75, 1.0, 3.0, 300.0):
        scales = lay.acc_scale64 / factor  # per channel M = factor·(its S_w / net.2's S_w[0])
        lay.requantize(float(scales[0]), 7, 0, 255, unsigned=True)
        assert (lay.shift[0] > 0) == (factor >= 1)
        want = multiply_by_quantized_multiplier(acc, lay.m0, lay.shift) + 7
        want = torch.clamp(want, 0, 255).to(torch.uint8)
        assert torch.equal(lay.requantize_acc(acc.clone()), want), factor


def test_strided_conv_accumulator_is_the_exact_integer_convolution():
    """Stride 2, padding (1, 2), a 3×2 kernel, odd input sizes: acc equals conv2d of the integer
    codes (q − Z) and weights in float64, where every value and sum is an exact integer."""
    i8, u8 = QuantizerConfig(name="int", bits=8), QuantizerConfig(name="uint", bits=8)
    torch.manual_seed(5)
    net = apply_qat(_cfg(i8, u8), nn.Sequential(nn.Conv2d(3, 8, (3, 2), stride=2,
                                                          padding=(1, 2)), nn.ReLU()))
    x = torch.randn(4, 3, 9, 7)
    net.train()(x)
    qat_step(net)
    lay = integer_layers(to_integer(net.eval()))["0"]
    q = lay.quantize_input(x)
    acc, lead = lay.accumulate(q)
    w = lay.weight_t.t().double().reshape(8, 3, 2, 3).permute(0, 3, 1, 2)  # (kh, kw, C) → OIHW
    ref = torch.nn.functional.conv2d(q.double() - lay.z_in, w, stride=2, padding=(1, 2))
    ref = ref + lay.bias.double().reshape(1, -1, 1, 1)
    assert lead == (4, 5, 5)
    assert torch.equal(acc.reshape(4, 5, 5, 8).permute(0, 3, 1, 2).double(), ref)


# ------------------------------------------------------------------ against the fake-quant model
def _fake_codes(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each quantized layer's input codes in the fake-quant model: round(x̂/S) + Z."""
    from dqt.quant.export.integer_inference import _act_params

    mods = {n: model.get_submodule(n) for n in names}
    seen, handles = _capture(mods)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for n, m in mods.items():
        s, z, lo, hi = _act_params(m.input_quantizer)
        with torch.no_grad():
            xq = m.input_quantizer(seen[n])
        out[n] = torch.round(xq / s).long() + z
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_integer_model_agrees_with_fake_quant_within_one_step(kind):
    """Each layer's requantized output (the next layer's input codes) against the fake-quant
    model's, in output quantization steps. Isolated (the layer run on the fake-quant model's own
    input codes): ≤ 1 step, on ≤ 0.2% of the codes (measured ≤ 0.072%: the int32 bias and the
    fp32 rounding of the fake-quant sum move values that lie within ~10^-6 of a rounding
    boundary). Chained through the whole model, where a flipped code feeds the next layer:
    ≤ 1 step (measured max 1) on ≤ 3% (measured ≤ 1.62%, the BN CNN's last layer); the logits
    then agree in argmax on ≥ 99% of the digits (measured ≥ 99.67%)."""
    model, x = _calibrated(kind)
    gm = to_integer(model)
    lays = integer_layers(gm)
    names = list(lays)
    fake = _fake_codes(model, names, x)
    ins, handles = _capture(lays)
    with torch.no_grad():
        y, ref = gm(x), model(x)
    for h in handles:
        h.remove()
    for prev, name in zip(names, names[1:]):
        q = ins[name]
        assert not q.is_floating_point(), name
        d = (q.long() - fake[name]).abs()
        assert d.max().item() <= 1 and d.float().mean().item() <= 0.03, \
            (name, d.max().item(), d.float().mean().item())
        lay = lays[prev]
        with torch.no_grad():
            o = lay(fake[prev].to(torch.uint8 if lay.in_unsigned else torch.int8))
        if o.dim() == 4:
            o = torch.nn.functional.max_pool2d(o, 2)
        d = (o.reshape(q.shape).long() - fake[name]).abs()
        assert d.max().item() <= 1 and d.float().mean().item() <= 0.002, \
            (name, d.max().item(), d.float().mean().item())
    assert (y.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.99


# ------------------------------------------------------------------ refusals
def _refused(cfg: QATConfig, match: str, calibrate: bool = True) -> None:
    torch.manual_seed(0)
    model = apply_qat(cfg, MLP(64, [32, 32], 10)).train()
    if calibrate:
        model(torch.randn(16, 64))
        qat_step(model)
    with pytest.raises(ValueError, match=match):
        to_integer(model.eval())


def _cfg(weight: QuantizerConfig | None, act: QuantizerConfig | None) -> QATConfig:
    return QATConfig(name="t", default=QATSlotsConfig(weight=weight, act=act),
                     keep_first_last=False)


def test_refusals_name_the_layer_and_the_format():
    i8, u8 = QuantizerConfig(name="int", bits=8), QuantizerConfig(name="uint", bits=8)
    _refused(preset("w4a4"), r"layer 'net.2' has weight format int\(bits=4")
    _refused(_cfg(u8, u8), r"layer 'net.0' has weight format uint\(bits=8")
    _refused(_cfg(QuantizerConfig(name="int", bits=8, group_size=32), u8),
             r"layer 'net.0' has weight format int\(bits=8.*group_size=32")
    _refused(_cfg(i8, QuantizerConfig(name="uint", bits=8, per_token=True)),
             r"layer 'net.0' has input activation format uint\(bits=8.*per_token=True")
    _refused(_cfg(i8, QuantizerConfig(name="uint", bits=4)),
             r"layer 'net.0' has input activation format uint\(bits=4")
    _refused(_cfg(i8, None), r"layer 'net.0' quantizes only its weight")
    _refused(_cfg(None, u8), r"layer 'net.0' quantizes only its input")
    _refused(_cfg(QuantizerConfig(name="dorefa_w", bits=2), u8), r"'net.0' has weight format "
             r"dorefa_w")
    _refused(_cfg(i8, u8), "'net.0' has an uncalibrated activation range", calibrate=False)
    with pytest.raises(ValueError, match="no quantized Linear / Conv2d"):
        to_integer(MLP(64, [32], 10))


def test_refuses_an_embedding_and_a_grouped_conv():
    i8, u8 = QuantizerConfig(name="int", bits=8), QuantizerConfig(name="uint", bits=8)
    conv = apply_qat(_cfg(i8, u8), nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU()))
    conv.train()(torch.randn(2, 4, 6, 6))
    qat_step(conv)
    with pytest.raises(ValueError, match="layer '0' is a grouped"):
        to_integer(conv.eval())
    emb = apply_qat(QATConfig(name="t", default=QATSlotsConfig(weight=i8), keep_first_last=False,
                              types=["Embedding"]), nn.Sequential(nn.Embedding(10, 4)))
    with pytest.raises(ValueError, match="layer '0' is of type Embedding"):
        to_integer(emb)

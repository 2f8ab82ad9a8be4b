"""Per-group weight scales (``group_size``), per-token dynamic activations (``per_token``),
BitNet b1.58's absmean ternary weights, and the presets built on them (``int8dyn_int4w``,
``bitnet_b158``): bit for bit against the formulas written out here, and against torchao's
fake quantizers where torchao is installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dqt.errors import ConfigError
from dqt.quant import QUANTIZERS, apply_qat, preset, qat_step, quantize_
from dqt.quant.config import QATConfig, QATRuleConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant.export.convert import load_packed
from dqt.quant.export.serialize import read_export, save_export
from dqt.quant.prepare import layer_quantizers, weight_quantizers
from dqt.train.data import DataMeta
from dqt.train.models import GPTConfig, TransformerConfig, build_model

TINY = torch.finfo(torch.float32).tiny
SHAPES = [((8, 128), 32), ((8, 128), 64), ((16, 256), 128), ((3, 384), 32), ((5, 96), 32)]


def q(name: str, kind: str, **args):
    return QUANTIZERS.get(name)(kind, **args)


def weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.2
    w[0, : shape[1] // 2] = 0.0  # an all-zero group: the eps clamp
    return w


def tokens_in(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, 96, generator=g) * torch.rand(4, 7, 1, generator=g) * 5
    x[0, 0] = 0.0  # an all-zero token
    x[0, 1] = x[0, 1].abs()  # all positive: min clamps to 0
    x[0, 2] = -x[0, 2].abs()  # all negative: max clamps to 0
    x[0, 3] = 1e-7 * x[0, 3]  # tiny values
    return x


# ------------------------------------------------------------------ the formulas, bit for bit
def int_group_ref(w, bits, g):
    """torchao's symmetric per-group fake quantization, written out."""
    wg = w.reshape(w.shape[0], -1, g)
    s = torch.clamp(wg.abs().amax(-1, keepdim=True) / ((2 ** bits - 1) / 2), min=TINY)
    q = torch.clamp(torch.round(wg * (1.0 / s)), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return (q * s).reshape(w.shape)


def uint_token_ref(x, bits=8):
    """torchao's per-token asymmetric qparams (int8: qmin −128) and fake quantization."""
    qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    lo = torch.clamp(x.amin(-1, keepdim=True), max=0.0)
    hi = torch.clamp(x.amax(-1, keepdim=True), min=0.0)
    s = torch.clamp((hi - lo) / float(qmax - qmin), min=TINY)
    z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax)  # round(−min/S) − 128
    q = torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax)
    return (q - z) * s


def bitnet_activation_quant(x):
    """BitNet b1.58's activation_quant, as published."""
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


@pytest.mark.parametrize("shape,g", SHAPES)
@pytest.mark.parametrize("bits", [4, 8, 2])
def test_int_group_equals_the_formula(shape, g, bits):
    w = weights(shape)
    y = q("int", "weight", bits=bits, group_size=g)(w)
    assert torch.equal(y, int_group_ref(w, bits, g))
    # at most 2^bits levels per group, one scale each
    for row in y.reshape(-1, g):
        assert row.unique().numel() <= 2 ** bits


@pytest.mark.parametrize("shape,g", SHAPES[:3])
def test_uint_group_is_uint_on_each_group(shape, g):
    w = weights(shape, 1)
    y = q("uint", "weight", bits=4, group_size=g)(w)
    per_row = q("uint", "weight", bits=4)(w.reshape(-1, g)).reshape(shape)
    assert torch.equal(y, per_row)


def test_per_token_asymmetric_equals_the_formula():
    x = tokens_in()
    y = q("uint", "act", bits=8, per_token=True)(x)
    assert torch.equal(y, uint_token_ref(x))
    assert torch.equal(y[0, 0], torch.zeros(96))


def test_per_token_symmetric_is_bitnets_activation_quant():
    x = tokens_in(2)
    assert torch.equal(q("int", "act", bits=8, per_token=True)(x), bitnet_activation_quant(x))


def test_per_token_has_no_state_and_follows_each_input():
    quant = q("uint", "act", bits=8, per_token=True).train()
    assert quant.observer is None and quant.stats() is None
    x = tokens_in(3)
    quant(x * 100)
    assert torch.equal(quant(x), uint_token_ref(x))


def test_absmean_is_bitnet_b158():
    w = weights((16, 64), 4)
    y = q("absmean", "weight")(w)
    gamma = w.abs().mean()
    assert torch.equal(y, torch.clamp(torch.round(w / (gamma + 1e-5)), -1, 1) * gamma)
    levels = set(y.unique().tolist())
    assert levels <= {-gamma.item(), 0.0, gamma.item()} and len(levels) == 3


# ------------------------------------------------------------------ torchao itself
def torchao_fq(*args, **kwargs):
    qat = pytest.importorskip("torchao.quantization.qat")
    return qat.fake_quantizer.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(*args, **kwargs))


@pytest.mark.parametrize("shape,g", SHAPES)
def test_int_group_equals_torchao(shape, g):
    fq = torchao_fq(torch.int4, group_size=g)
    for seed in range(3):
        w = weights(shape, seed).requires_grad_()
        ours = q("int", "weight", bits=4, group_size=g)(w)
        theirs = fq(w)
        assert torch.equal(ours, theirs)
        (g1,) = torch.autograd.grad(ours.sum(), w)
        (g2,) = torch.autograd.grad(theirs.sum(), w)
        assert torch.equal(g1, g2)


def test_per_token_asymmetric_equals_torchao():
    fq = torchao_fq(torch.int8, "per_token", is_symmetric=False)
    for seed in range(3):
        x = tokens_in(seed).requires_grad_()
        ours = q("uint", "act", bits=8, per_token=True)(x)
        theirs = fq(x)
        assert torch.equal(ours, theirs)
        (g1,) = torch.autograd.grad(ours.sum(), x)
        (g2,) = torch.autograd.grad(theirs.sum(), x)
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ straight-through gradients
def test_group_ste_is_identity_inside_and_zero_where_clamped():
    w = weights((8, 128), 5).requires_grad_()
    (grad,) = torch.autograd.grad(q("int", "weight", bits=4, group_size=32)(w).sum(), w)
    wg = w.detach().reshape(8, -1, 32)
    s = torch.clamp(wg.abs().amax(-1, keepdim=True) / 7.5, min=TINY)
    r = torch.round(wg * (1.0 / s))
    inside = ((r >= -8) & (r <= 7)).reshape(8, 128)
    assert not inside.all()  # a group's +max lands on 7.5 → 8 → clamped to 7
    assert torch.equal(grad[~inside], torch.zeros_like(grad[~inside]))
    torch.testing.assert_close(grad[inside], torch.ones_like(grad[inside]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["int", "uint"])
def test_per_token_ste_is_identity(name):
    x = tokens_in(6)[1:].requires_grad_()
    (grad,) = torch.autograd.grad(q(name, "act", bits=8, per_token=True)(x).sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(grad), rtol=1e-6, atol=0)


def test_absmean_ste_is_identity():
    w = weights((8, 32), 7).requires_grad_()
    (grad,) = torch.autograd.grad((q("absmean", "weight")(w) * 3).sum(), w)
    assert torch.equal(grad, torch.full_like(w, 3.0))


# ------------------------------------------------------------------ checks, before any work
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                         nn.Linear(32, 4))


GROUP32 = QuantizerConfig(name="int", bits=4, group_size=32)


def test_group_size_that_does_not_divide_the_rows_names_the_key():
    model = mlp()
    with pytest.raises(ConfigError, match=r"qat\.default\.weight\.group_size: int on 2\.weight: "
                       r"32 does not divide the 48 input values"):
        apply_qat(QATConfig(name="t", default=QATSlotsConfig(weight=GROUP32),
                            keep_first_last=False), model)
    assert not any(layer_quantizers(m)["weight"] for m in model)  # nothing was attached
    with pytest.raises(ConfigError, match=r"qat\.rules\[1\]\.weight\.group_size"):
        apply_qat(QATConfig(name="t", rules=[QATRuleConfig(match="0", weight=GROUP32),
                                             QATRuleConfig(match="2", weight=GROUP32)]), mlp())


@pytest.mark.parametrize("slot,spec,message", [
    ("act", QuantizerConfig(name="int", group_size=32), r"qat\.default\.act\.group_size: groups"),
    ("weight", QuantizerConfig(name="uint", per_token=True), r"qat\.default\.weight\.per_token"),
    ("weight", QuantizerConfig(name="int", group_size=1), r"qat\.default\.weight\.group_size: "
                                                          r"must be >= 2"),
    ("weight", QuantizerConfig(name="int", group_size=32, per_channel=False),
     r"qat\.default\.weight\.per_channel"),
])
def test_bad_arguments_name_the_key(slot, spec, message):
    with pytest.raises(ConfigError, match=message):
        QATConfig(name="t", default=QATSlotsConfig(**{slot: spec}))


def test_group_size_zero_is_per_channel():
    w = weights((8, 64), 8)
    assert torch.equal(q("int", "weight", bits=4, group_size=0)(w), q("int", "weight", bits=4)(w))


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("name", ["int", "uint"])
def test_grouped_export_reloads_bit_for_bit(name, tmp_path):
    spec = QuantizerConfig(name=name, bits=4, group_size=16)
    cfg = QATConfig(name="t", default=QATSlotsConfig(
        weight=spec, act=QuantizerConfig(name="uint", bits=8, per_token=True)),
        keep_first_last=False)
    model = apply_qat(cfg, mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step(), opt.zero_grad()
        qat_step(model)
    model.eval()
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = model(x)
    save_export(model, str(tmp_path), {})
    tensors, doc = read_export(str(tmp_path))
    assert {v["format"] for v in doc["layers"].values()} == {"affine_group"}
    fresh = load_packed(apply_qat(cfg, mlp()), tensors, doc).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


# ------------------------------------------------------------------ the presets on transformers
def encoder():
    torch.manual_seed(0)
    return build_model(TransformerConfig(n_layer=2, n_head=2, n_embd=64),
                       DataMeta("tokens", (8,), 12))


def gpt():
    torch.manual_seed(0)
    return build_model(GPTConfig(n_layer=2, n_head=2, n_embd=64), DataMeta("lm", (8,), 12))


@pytest.mark.parametrize("model_fn", [encoder, gpt], ids=["transformer", "gpt"])
@pytest.mark.parametrize("name", ["int8dyn_int4w", "bitnet_b158"])
def test_presets_train_on_transformers(model_fn, name):
    model = model_fn()
    qat = quantize_(model, preset(name))
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    head = getattr(model, "head", None) or getattr(model, "lm_head", None)
    assert head is not None
    weights_q = {id(m): weight_quantizers(m) for m in linears}
    for m in linears:
        if m is head and name == "bitnet_b158":
            assert not weights_q[id(m)], "BitNet keeps the output head in full precision"
        else:
            assert weights_q[id(m)], m
    x = torch.randint(0, 12, (3, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        out = model(x)
        out.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.isfinite().all()
                   for p in model.parameters() if p.requires_grad)
        qat.before_step(), opt.step(), qat.after_step(), opt.zero_grad()
    assert out.isfinite().all()
    for m in linears:
        for t, wq in weights_q[id(m)].items():
            w = getattr(m, t).detach()
            if name == "bitnet_b158":
                assert wq.name == "absmean"
                gamma = m.parametrizations[t].original.detach().abs().mean()
                assert set(w.unique().tolist()) <= {-gamma.item(), 0.0, gamma.item()}
            else:
                assert (wq.name, wq.bits, wq.group_size) == ("int", 4, 32)
                for row in w.reshape(-1, 32):
                    assert row.unique().numel() <= 16
        acts = layer_quantizers(m)["act"]
        if acts is not None:
            assert acts.per_token and acts.bits == 8

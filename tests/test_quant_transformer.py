"""QAT of PyTorch's own transformer blocks (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``)
and of the repository's GPT: every weight quantized, the attention computing with the quantized
weights on its slow and fast paths, every quantizer the plan lists actually running, quantizers
that could never run refused (rules) or left out with a reason (default), the warning of an
unsigned activation quantizer on signed inputs, and the export of the attention's weights."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dqt.errors import ConfigError
from dqt.quant import QUANTIZERS, Quantizer, preset, quantize_
from dqt.quant.config import QATConfig, QATRuleConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant.export.convert import convert, load_packed
from dqt.quant.prepare import format_plan, layer_quantizers, weight_quantizers
from dqt.train.data import DataMeta
from dqt.train.models import GPTConfig, TransformerConfig, build_model

INT4 = QuantizerConfig(name="int", bits=4)


def encoder(n_layer: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return build_model(TransformerConfig(n_layer=n_layer, n_head=2, n_embd=16),
                       DataMeta("tokens", (8,), 12))


def gpt() -> nn.Module:
    torch.manual_seed(0)
    return build_model(GPTConfig(n_layer=2, n_head=2, n_embd=16), DataMeta("lm", (8,), 12))


def tokens() -> torch.Tensor:
    return torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ the plan
def test_w8a8_plan_of_a_transformer_encoder_layer(caplog):
    caplog.set_level("INFO", logger="dqt")
    model = encoder()
    qat = quantize_(model, preset("w8a8"))
    int8 = r"int\(bits=8, per_channel=True, momentum=0\.1\)"
    uint8 = r"uint\(bits=8, per_channel=False, momentum=0\.1\)"
    text = caplog.text
    assert re.search(rf"encoder\.layers\.0\.self_attn +MultiheadAttention +{int8} on in_proj_weight"
                     rf" +{uint8} on query/key/value +fp32 +default", text), text
    assert re.search(rf"encoder\.layers\.0\.self_attn\.out_proj +NonDynamicallyQuantizableLinear +"
                     rf"{int8} +— \(never called: MultiheadAttention reads out_proj\.weight\) "
                     rf"+fp32 +default", text), text
    assert re.search(rf"encoder\.layers\.0\.linear1 +Linear +{int8} +{uint8} +fp32 +default", text)
    layer = model.encoder.layers[0]
    assert list(weight_quantizers(layer.self_attn)) == ["in_proj_weight"]
    assert not hasattr(layer.self_attn.out_proj, "input_quantizer")
    # every weight of every block is quantized: the attention's in_proj, out_proj, linear1/2
    blocks = {n: p for n, p in model.named_parameters() if n.startswith("encoder.")
              and p.dim() == 2}
    assert blocks and all(".parametrizations." in n and n.endswith(".original") for n in blocks)
    assert {lp.name: lp.source for lp in qat.plan}["encoder.layers.1.self_attn"] == "default"


def test_attention_not_in_types_says_so():
    model = encoder(1)
    qat = quantize_(model, QATConfig(name="t", default=QATSlotsConfig(weight=INT4),
                                     types=["Linear"]))
    row = {lp.name: lp for lp in qat.plan}["encoder.layers.0.self_attn"]
    assert row.source == "not in qat.types" and not weight_quantizers(row.module)
    assert re.search(r"encoder\.layers\.0\.self_attn +MultiheadAttention +fp32 +fp32 +fp32 "
                     r"+not in qat\.types", format_plan(qat.plan))


# ------------------------------------------------------------------ the forward uses them
def _int4(w: torch.Tensor) -> torch.Tensor:
    return QUANTIZERS.get("int")("weight", bits=4)(w)


def _attention(mha: nn.MultiheadAttention, q, k, v, wq, wk, wv, wo) -> torch.Tensor:
    """Multi-head attention written out (batch first, no mask, no dropout)."""
    e, h = mha.embed_dim, mha.num_heads
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], h, e // h).transpose(1, 2)

    qh, kh, vh = heads(q @ wq.T + bq), heads(k @ wk.T + bk), heads(v @ wv.T + bv)
    a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(e // h), dim=-1)
    y = (a @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], e)
    return y @ wo.T + mha.out_proj.bias


@pytest.mark.parametrize("kdim", [None, 6])
@pytest.mark.parametrize("act", [False, True])
def test_attention_computes_with_the_quantized_weights(kdim, act):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
    net = nn.ModuleDict({"attn": mha})
    slots = QATSlotsConfig(weight=INT4, act=QuantizerConfig(name="int", bits=8) if act else None)
    quantize_(net, QATConfig(name="t", default=slots, keep_first_last=False))
    names = ["in_proj_weight"] if kdim is None else ["q_proj_weight", "k_proj_weight",
                                                    "v_proj_weight"]
    assert list(weight_quantizers(mha)) == names
    orig = {n: mha.parametrizations[n].original for n in names}
    if kdim is None:
        wq, wk, wv = _int4(orig["in_proj_weight"]).chunk(3)
    else:
        wq, wk, wv = (_int4(orig[n]) for n in names)
    wo = _int4(mha.out_proj.parametrizations.weight.original)
    assert not torch.equal(wo, mha.out_proj.parametrizations.weight.original)
    x = torch.randn(2, 5, 8)
    kv = x if kdim is None else torch.randn(2, 5, kdim)
    mha.eval()  # int's EMA range is uncommitted: the batch range, the same at every call
    qin = mha.input_quantizer if act else (lambda t: t)
    ref = _attention(mha, qin(x), qin(kv), qin(kv), wq, wk, wv, wo)
    assert act == (not torch.equal(qin(x), x))
    out = mha(x, kv, kv, need_weights=False)[0]  # with grad: the slow path
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # eval, no grad, self-attention: the fused fast path where it applies
        out = mha(x, kv, kv, need_weights=False)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_slow_and_fast_paths_use_the_quantized_weights(norm_first):
    torch.manual_seed(0)
    kw = dict(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True,
              norm_first=norm_first)
    layer = nn.TransformerEncoderLayer(**kw)
    quantize_(layer, QATConfig(name="t", default=QATSlotsConfig(weight=INT4),
                               keep_first_last=False))
    plain = nn.TransformerEncoderLayer(**kw)
    state = {k.replace("parametrizations.", "").replace(".original", ""): v
             for k, v in layer.state_dict().items()}
    for k in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
              "linear2.weight"):
        state[k] = _int4(state[k])
    plain.load_state_dict(state)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), plain(x))  # training: the Python path
    layer.eval(), plain.eval()
    with torch.no_grad():  # no hooks, eval, no grad: torch._transformer_encoder_layer_fwd
        torch.testing.assert_close(layer(x), plain(x))
    assert not torch.equal(plain.linear1.weight, layer.linear1.parametrizations.weight.original)


# ------------------------------------------------------------------ what runs
PRESETS = ["w8a8", "w4a4", "dorefa_w2a2", "dorefa_w2a2_g8", "bnn", "lsq_w4a4", "pact_w4a4",
           "xnor", "flexpoint", "wage", "twn"]


@pytest.mark.parametrize("model_fn", [encoder, gpt], ids=["transformer", "gpt"])
@pytest.mark.parametrize("name", PRESETS)
def test_every_listed_quantizer_runs(model_fn, name):
    model = model_fn()
    qat = quantize_(model, preset(name))
    calls: dict[int, int] = {}
    listed: dict[int, str] = {}
    for lp in qat.plan:
        qs = layer_quantizers(lp.module)
        for slot in ("act", "grad"):
            assert (qs[slot] is not None) == (lp.specs[slot] is not None), (lp.name, slot)
            if qs[slot] is not None:
                listed[id(qs[slot])] = f"{lp.name}.{slot}"
        assert (lp.specs["weight"] is not None) == bool(weight_quantizers(lp.module)), lp.name
        for t, q in weight_quantizers(lp.module).items():
            listed[id(q)] = f"{lp.name}.{t}"
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.register_forward_hook(lambda q, *_: calls.__setitem__(id(q), calls.get(id(q), 0) + 1))
            if m.kind == "grad":  # the backward pass runs quantize
                m.quantize = (lambda q, f: lambda g: (
                    calls.__setitem__(-id(q), 1), f(g))[1])(m, m.quantize)
    model.train()
    model(tokens()).float().square().mean().backward()
    assert listed, name
    assert [w for i, w in listed.items() if not calls.get(i)] == [], name
    grads = [w for i, w in listed.items() if w.endswith(".grad")]
    assert [w for i, w in listed.items() if w.endswith(".grad") and not calls.get(-i)] == []
    assert bool(grads) == (name in ("dorefa_w2a2_g8", "flexpoint", "wage"))
    calls.clear()
    model.eval()
    with torch.no_grad():  # inference: the attention's fast paths read the same attributes
        model(tokens())
    assert [w for i, w in listed.items() if not calls.get(i)] == [], name


def test_out_proj_gradient_quantizer_runs_on_the_attention_output():
    model = encoder(1)
    quantize_(model, preset("dorefa_w2a2_g8"))
    out_proj = model.encoder.layers[0].self_attn.out_proj
    seen = []
    out_proj.grad_quantizer.quantize = lambda g: (seen.append(g.shape), g * 0)[1]
    model(tokens()).sum().backward()
    assert seen == [torch.Size([3, 8, 16])]
    # the gradient into out_proj's output is what the quantizer returned: zero
    assert not out_proj.parametrizations.weight.original.grad.any()


# ------------------------------------------------------------------ refused
ATTN = "encoder.layers.0.self_attn"
REFUSED = [
    (QATRuleConfig(match="*.out_proj", weight=INT4, act=QuantizerConfig(name="uint", bits=8)),
     f"qat.rules[0].act: uint on {ATTN}.out_proj: nn.MultiheadAttention never calls "
     "out_proj.forward (F.multi_head_attention_forward reads out_proj.weight), so an input "
     f"quantizer there would never run; give {ATTN}.out_proj a rule without act before this one"),
    (QATRuleConfig(type="Linear", act=QuantizerConfig(name="dorefa_a")),
     f"qat.rules[0].act: dorefa_a on {ATTN}.out_proj: nn.MultiheadAttention never calls "
     "out_proj.forward (F.multi_head_attention_forward reads out_proj.weight), so an input "
     f"quantizer there would never run; give {ATTN}.out_proj a rule without act before this one"),
    (QATRuleConfig(type="MultiheadAttention", grad=QuantizerConfig(name="dorefa_g")),
     f"qat.rules[0].grad: dorefa_g on {ATTN}: the q/k/v projections run inside "
     "F.multi_head_attention_forward, so no hook reaches the gradient of their output; give "
     f"{ATTN} a rule without grad before this one"),
    (QATRuleConfig(match="re:.*self_attn", act=QuantizerConfig(name="xnor")),
     f"qat.rules[0].act: xnor on {ATTN}: xnor rescales the layer's output by its K, and the "
     f"attention's output is not linear in its input; give {ATTN} a rule without act before "
     "this one"),
]


@pytest.mark.parametrize("rule,message", REFUSED, ids=["out_proj", "type", "grad", "xnor"])
def test_a_rule_whose_quantizer_would_never_run_is_an_error(rule, message):
    with pytest.raises(ConfigError) as e:
        quantize_(encoder(1), QATConfig(name="t", rules=[rule]))
    assert str(e.value) == message


def test_a_rule_before_it_for_out_proj_is_the_way_out():
    model = encoder(1)
    quantize_(model, QATConfig(name="t", rules=[
        QATRuleConfig(match="*.out_proj", weight=INT4),
        QATRuleConfig(type="Linear", weight=INT4, act=QuantizerConfig(name="uint", bits=8))]))
    attn = model.encoder.layers[0].self_attn
    assert layer_quantizers(attn.out_proj)["act"] is None
    assert layer_quantizers(model.encoder.layers[0].linear1)["act"].name == "uint"


def test_default_xnor_leaves_the_attention_input_and_says_why():
    qat = quantize_(encoder(1), preset("xnor"))
    row = {lp.name: lp for lp in qat.plan}[ATTN]
    assert row.notes == {"act": "xnor rescales the output"} and row.specs["act"] is None
    assert "— (xnor rescales the output)" in format_plan(qat.plan)


# ------------------------------------------------------------------ unsigned on signed
def test_unsigned_activation_quantizer_on_signed_inputs_warns_once_per_layer(caplog):
    caplog.set_level("WARNING", logger="dqt")
    model = encoder(1)
    quantize_(model, preset("dorefa_w2a2"))
    model(tokens()), model(tokens())
    warned = re.findall(r"qat: dorefa_a\(bits=2\) on (\S+) quantizes its input to \[0, 1\], but "
                        r"the input has negative values", caplog.text)
    # after LayerNorm (attention, linear1) and after GELU (linear2, whose minimum is −0.17)
    assert sorted(warned) == sorted([ATTN, "encoder.layers.0.linear1",
                                     "encoder.layers.0.linear2"])


@pytest.mark.parametrize("name", ["w8a8", "dorefa_w2a2"])
def test_no_warning_for_signed_quantizers_or_non_negative_inputs(caplog, name):
    from dqt.train.models import MLP

    caplog.set_level("WARNING", logger="dqt")
    if name == "w8a8":  # uint's range follows the data, negatives included
        model = encoder(1)
        quantize_(model, preset(name))
        model(tokens())
    else:  # dorefa_a after a ReLU
        torch.manual_seed(0)
        model = MLP(8, [8, 8], 3)
        quantize_(model, preset(name))
        model(torch.randn(4, 8))
    assert "negative values" not in caplog.text


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("name", ["w8a8", "twn"])
def test_attention_weights_export_and_reload_bitwise(name):
    model = encoder(1)
    quantize_(model, preset(name))
    x = tokens()
    model(x)
    model.eval()
    tensors, layers = convert(model)
    assert layers[f"{ATTN}.in_proj_weight"]["shape"] == [48, 16]
    assert f"{ATTN}.parametrizations.in_proj_weight.original" not in tensors
    fresh = encoder(1)
    quantize_(fresh, preset(name))
    load_packed(fresh, tensors, {"layers": layers}).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    rows = {r["layer"] for r in quantize_(model, QATConfig()).summary()["layers"]}
    assert f"{ATTN}.in_proj_weight" in rows and f"{ATTN}.out_proj" in rows


def test_the_weights_of_a_quantized_encoder_load_into_a_plain_one():
    """``checkpoint.init_from`` reads a QAT run's weights through ``plain_state_dict``: every
    parametrized tensor's real weight comes back under its own name."""
    from dqt.train.checkpoint import plain_state_dict

    qat = encoder()
    quantize_(qat, preset("w8a8"))
    with torch.no_grad():  # the QAT run trained: its real weights differ from a fresh model's
        for p in qat.parameters():
            p.add_(0.01)
    state = plain_state_dict(qat.state_dict())
    plain = encoder()
    plain.load_state_dict(state)  # strict: nothing missing, nothing left over
    attn = "encoder.layers.0.self_attn."
    assert torch.equal(state[attn + "in_proj_weight"],
                       qat.encoder.layers[0].self_attn.parametrizations.in_proj_weight.original)
    assert not torch.equal(plain.encoder.layers[0].self_attn.in_proj_weight,
                           encoder().encoder.layers[0].self_attn.in_proj_weight)

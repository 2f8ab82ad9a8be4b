"""Rules that attach quantizers (name / glob / re: / type, first match wins, strict, first/last
layer), every conf/qat preset composed through Hydra and built on every model, BN folding,
bad-input messages (exact)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from tests.conftest import CONF
from dqt.errors import ConfigError
from dqt.quant.config import QATConfig, QATRuleConfig, QATSlotsConfig, QuantizerConfig
from dqt.config import to_typed
from dqt.quant import QUANTIZERS, apply_qat, qat_step
from dqt.quant.prepare import layer_quantizers
from dqt.train.data import DataMeta
from dqt.train.models import build_model

PRESETS = sorted(p.stem for p in (CONF / "qat").glob("*.yaml"))
DORE = QuantizerConfig(name="dorefa_w", bits=2)
TWN = QuantizerConfig(name="twn")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, idx):
        x = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        return self.head(self.block(x))


def plan(cfg, model=None):
    model = model or Net()
    apply_qat(cfg, model)
    return {n: {s: (q.name if q is not None else None) for s, q in layer_quantizers(m).items()}
            for n, m in model.named_modules() if n in ("emb", "conv", "block.0", "block.2", "head")}


def test_default_with_first_and_last_layer_in_full_precision():
    p = plan(QATConfig(name="t", default=QATSlotsConfig(weight=DORE)))
    assert [p[n]["weight"] for n in ("emb", "conv", "block.0", "block.2", "head")] == \
        [None, "dorefa_w", "dorefa_w", "dorefa_w", None]
    p = plan(QATConfig(name="t", default=QATSlotsConfig(weight=DORE), keep_first_last=False))
    assert all(p[n]["weight"] == "dorefa_w" for n in p)


@pytest.mark.parametrize("rule,hit", [
    (QATRuleConfig(match="block.2"), {"block.2"}),  # exact name
    (QATRuleConfig(match="block.*"), {"block.0", "block.2"}),  # glob
    (QATRuleConfig(match="re:(conv|head)"), {"conv", "head"}),  # regex, full match
    (QATRuleConfig(match="re:blo"), set()),  # fullmatch, not search
    (QATRuleConfig(type="Conv1d"), {"conv"}),  # type by class name
    (QATRuleConfig(type="torch.nn.Embedding"), {"emb"}),  # dotted type
    (QATRuleConfig(type="Linear", match="*.0"), {"block.0"}),  # both must hold
])
def test_rule_matching(rule, hit):
    rule.weight = TWN
    p = plan(QATConfig(name="t", rules=[rule], keep_first_last=False))
    assert {n for n, s in p.items() if s["weight"] == "twn"} == hit


def test_first_match_wins_and_a_rule_is_the_whole_plan():
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=DORE, act=QuantizerConfig(name="dorefa_a")),
                    rules=[QATRuleConfig(match="block.0", weight=TWN),
                           QATRuleConfig(type="Linear", weight=QuantizerConfig(name="bwn"))])
    p = plan(cfg)
    assert p["block.0"] == {"weight": "twn", "act": None, "grad": None}  # first rule; no act
    assert p["block.2"]["weight"] == "bwn" and p["head"]["weight"] == "bwn"  # rule beats last
    assert p["conv"] == {"weight": "dorefa_w", "act": "dorefa_a", "grad": None}  # default
    assert p["emb"]["weight"] is None  # first layer


def test_embedding_gets_no_input_quantizer():
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=DORE, act=QuantizerConfig(name="dorefa_a"),
                                                     grad=QuantizerConfig(name="dorefa_g")),
                    keep_first_last=False)
    p = plan(cfg)
    assert p["emb"] == {"weight": "dorefa_w", "act": None, "grad": "dorefa_g"}


def test_strict_rule_matching_nothing_is_an_error():
    cfg = QATConfig(name="t", rules=[QATRuleConfig(match="block.0", weight=TWN),
                                     QATRuleConfig(match="layer9.*", weight=TWN)], strict=True)
    with pytest.raises(ConfigError) as e:
        plan(cfg)
    assert str(e.value) == ("qat.rules[1]: match='layer9.*' matches no layer (qat.strict=true); "
                            "the layers are: emb, conv, block.0, block.2, head")
    cfg.strict = False
    plan(cfg)  # not strict: fine


def test_users_own_subclass_is_matched_by_its_base_type():
    class MyLinear(nn.Linear):
        pass

    m = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4), nn.Linear(4, 2))
    apply_qat(QATConfig(name="t", default=QATSlotsConfig(weight=TWN)), m)
    assert layer_quantizers(m[1])["weight"].name == "twn"
    assert m(torch.randn(3, 4)).shape == (3, 2)


def test_prepare_logs_the_plan(caplog):
    caplog.set_level("INFO", logger="dqt")
    plan(QATConfig(name="mine", default=QATSlotsConfig(weight=DORE)))
    text = caplog.text
    assert "qat mine: per-layer plan" in text
    assert re.search(r"block\.0 +Linear +dorefa_w\(bits=2, rescale=False\) +fp32 +fp32 +default", text)
    assert "first layer (keep_first_last)" in text


# ------------------------------------------------------------------ presets × models
META = {"mlp": DataMeta("classify", (1, 8, 8), 10), "cnn": DataMeta("classify", (1, 8, 8), 10),
        "resnet20": DataMeta("classify", (3, 8, 8), 10), "gpt": DataMeta("lm", (16,), 20),
        "transformer": DataMeta("tokens", (16,), 20)}
DATA = {"gpt": ["data=text"], "transformer": ["data=sort", "model.n_layer=1", "model.n_embd=32"]}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_trains_a_step_on_every_model(compose, preset):
    for model in ("mlp", "cnn", "resnet20", "gpt", "transformer"):
        cfg = to_typed(compose(f"qat={preset}", f"model={model}", *DATA.get(model, [])))
        assert cfg.qat.name == preset
        torch.manual_seed(0)
        net = apply_qat(cfg.qat, build_model(cfg.model, META[model]))
        meta = META[model]
        x = torch.randint(0, 20, (4, 16)) if meta.task != "classify" else \
            torch.randn(4, *meta.input_shape)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(2):
            out = net(x)
            out.float().square().mean().backward()
            opt.step(), opt.zero_grad()
            qat_step(net)
        assert torch.isfinite(out).all(), (preset, model)
        quantized = [n for n, m in net.named_modules() if any(layer_quantizers(m).values())]
        assert bool(quantized) == (preset != "none"), (preset, model)


def test_preset_none_leaves_the_model_untouched(compose):
    cfg = to_typed(compose("qat=none"))
    torch.manual_seed(0)
    a = build_model(cfg.model, META["mlp"])
    b = apply_qat(cfg.qat, a)
    assert b is a and not [m for m in a.modules() if "Parametrized" in type(m).__name__]


def test_cli_override_of_a_preset(compose):
    cfg = to_typed(compose("qat=dorefa_w2a2", "qat.default.weight.bits=4", "qat.keep_first_last=false"))
    assert cfg.qat.default.weight.bits == 4 and cfg.qat.keep_first_last is False


# ------------------------------------------------------------------ BN folding
def test_bn_folding_eval_equals_the_folded_conv():
    torch.manual_seed(0)
    model = build_model(type("C", (), {"name": "resnet20", "depth": 8, "width": 4})(), META["resnet20"])
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="int", bits=8)),
                    fold_bn=True, keep_first_last=False)
    apply_qat(cfg, model)
    x = torch.randn(8, 3, 8, 8)
    model.train()(x)  # BN statistics move
    model.eval()
    conv, bn = model.conv1, model.bn1
    f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wq = conv.weight  # = Q(W·γ/σ)
    folded = torch.nn.functional.conv2d(x, wq, bn.bias - bn.running_mean * f, padding=1)
    torch.testing.assert_close(bn(conv(x)), folded, rtol=1e-5, atol=1e-5)
    w = conv.parametrizations.weight.original
    from dqt.quant.methods.integer import IntSymmetric
    ref = IntSymmetric("weight", bits=8)(w * f.reshape(-1, 1, 1, 1))
    assert torch.equal(wq, ref)


def test_bn_folding_pairs_linear_with_batchnorm1d_in_the_bn_cnn(compose):
    from dqt.config import CNNConfig, MLPConfig
    from dqt.quant.bn_fold import find_layer_bn

    torch.manual_seed(0)
    cnn = build_model(CNNConfig(channels=[4, 6], hidden=12, batch_norm=True), META["cnn"])
    pairs = {n: find_layer_bn(cnn).get(m, ("-",))[0] for n, m in cnn.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert pairs == {"features.0": "features.1", "features.4": "features.5",
                     "classifier.0": "classifier.1", "classifier.3": "-"}
    mlp = build_model(MLPConfig(widths=[8, 8], batch_norm=True), META["mlp"])
    assert sorted(b for b, _ in find_layer_bn(mlp).values()) == ["net.1", "net.4"]
    assert find_layer_bn(build_model(MLPConfig(widths=[8]), META["mlp"])) == {}
    # Linear + BatchNorm1d folded: eval output = Linear(x, Q(W·γ/σ)) + β − μ·γ/σ
    apply_qat(to_typed(compose("qat=w8a8")).qat, cnn)  # the preset folds BN
    cnn.train()(torch.randn(16, 1, 8, 8))  # BN statistics move
    cnn.eval()
    fc, bn = cnn.classifier[0], cnn.classifier[1]
    f = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    h = torch.rand(5, fc.in_features)
    folded = torch.nn.functional.linear(fc.input_quantizer(h), fc.weight,
                                        bn.bias - bn.running_mean * f)
    torch.testing.assert_close(bn(fc(h)), folded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_norm,warned", [(False, True), (True, False)])
def test_warning_when_a_quantizer_that_assumes_bn_has_none_after_it(caplog, batch_norm, warned):
    from dqt.config import MLPConfig

    caplog.set_level("WARNING", logger="dqt")
    model = build_model(MLPConfig(widths=[8, 8], batch_norm=batch_norm), META["mlp"])
    apply_qat(QATConfig(name="t", default=QATSlotsConfig(weight=DORE)), model)
    layer = "net.3" if batch_norm else "net.2"
    assert ("dorefa_w(bits=2, rescale=False) on " + layer + " assumes a BatchNorm" in caplog.text) \
        == warned
    caplog.clear()  # rescale: true is the BN-free variant: no warning
    apply_qat(QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(
        name="dorefa_w", bits=2, rescale=True))), build_model(MLPConfig(widths=[8, 8]), META["mlp"]))
    assert "assumes a BatchNorm" not in caplog.text


# ------------------------------------------------------------------ bad input, exact messages
BAD = [
    (["qat=dorefa_w2a2", "qat.default.weight.bits=0"], "qat.default.weight.bits: must be in [1, 8]; got 0"),
    (["qat=w8a8", "qat.default.weight.name=nope"],
     "qat.default.weight.name: unknown quantizer 'nope'; available: "
     + ", ".join(QUANTIZERS.names())),  # every registered name, sorted (ap2, ..., xnor)
    (["qat=dorefa_w2a2", "qat.default.act.name=dorefa_w"],
     "qat.default.act.name: dorefa_w quantizes weight, not act; act quantizers: "
     + ", ".join(n for n in QUANTIZERS.names() if "act" in QUANTIZERS.get(n).kinds)),
    (["qat=twn", "qat.default.weight.frac_bits=3"],
     "qat.default.weight.frac_bits: twn does not take frac_bits (it takes: threshold, per_channel)"),
    (["qat=ttq", "qat.default.weight.threshold=1.5"], "qat.default.weight.threshold: must be in (0, 1.0); got 1.5"),
    (["qat=fixed_point", "qat.default.weight.frac_bits=null"],
     "qat.default.weight.frac_bits: linear needs frac_bits (the seed's sf: δ = 2^-frac_bits)"),
    (["qat=flexpoint", "qat.default.grad.bits=8"],
     "qat.default.grad.bits: flex16+5 has 16-bit mantissas; got 8"),
    (["qat=w8a8", "qat.default.act.per_channel=true"],
     "qat.default.act.per_channel: activations are quantized per tensor"),
    (["qat=qnn", "qat.default.act.max_val=3.8"], "qat.default.act.max_val: must be a multiple of step=0.25; got 3.8"),
    (["qat=bnn", "qat.replace_relu=gelu"], "qat.replace_relu: must be one of hardtanh, identity (or null); got 'gelu'"),
    (["qat=bwn", "qat.types=[Linear,LSTM]"],
     "qat.types[1]: must be one of Linear, Conv1d, Conv2d, Conv3d, Embedding, "
     "MultiheadAttention; got 'LSTM'"),
    (["qat=bwn", "+qat.rules=[{weight: {name: twn}}]"],
     "qat.rules[0]: needs match (name, glob or re:regex) or type (module class name)"),
    (["qat=bwn", "+qat.rules=[{match: 're:(', weight: {name: twn}}]"],
     "qat.rules[0].match: bad regular expression '(': missing ), unterminated subpattern at position 0"),
    (["qat=bwn", "+qat.rules=[{match: net.2, weight: {name: ttq, init: -1}}]"],
     "qat.rules[0].weight.init: must be > 0; got -1.0"),
    (["qat=ttq", "qat.quantizer_lr_mult=0"],
     "qat.quantizer_lr_mult: must be > 0 (the quantizer parameters' lr is optim.lr times it); "
     "got 0.0"),
    (["qat=pact_w4a4", "qat.quantizer_weight_decay=-0.1"],
     "qat.quantizer_weight_decay: must be >= 0; got -0.1"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_qat_config_names_the_key(compose, overrides, message):
    overrides = [o.replace("+qat.rules", "qat.rules") for o in overrides]
    with pytest.raises(ConfigError) as e:
        to_typed(compose(*overrides))
    assert str(e.value) == message


def test_typo_in_a_quantizer_key_is_rejected_by_hydra(compose):
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException) as e:
        compose("qat=dorefa_w2a2", "qat.default.weight.bitz=2")
    assert "Key 'bitz' not in 'QuantizerConfig'" in str(e.value.__cause__)


def test_unknown_preset_lists_the_options(compose):
    from hydra.errors import MissingConfigException
    with pytest.raises(MissingConfigException) as e:
        compose("qat=nope")
    assert "Could not find 'qat/nope'" in str(e.value) and "dorefa_w2a2" in str(e.value)

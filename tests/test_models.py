"""Tests for dqt.train.models: shapes, parameter counts, determinism, gradients, GPT causality,
config errors, the optional BatchNorm of the MLP/CNN, and a tiny-batch overfit check for every
model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dqt.errors import ConfigError
from dqt.config import CNNConfig, GPTConfig, MLPConfig, ResNetConfig
from dqt.train.models import MODELS, build_model, num_params


@dataclass(frozen=True)
class Meta:
    """Local stand-in for dqt.train.data.DataMeta (same three fields)."""

    task: str
    input_shape: tuple[int, ...]
    num_classes: int


DIGITS = Meta("classify", (1, 8, 8), 10)
MNIST = Meta("classify", (1, 28, 28), 10)
CIFAR = Meta("classify", (3, 32, 32), 10)
SYNTH = Meta("classify", (64,), 10)
TEXT = Meta("lm", (16,), 50)


def small(name: str):
    return {
        "mlp": MLPConfig(widths=[32, 32]),
        "mlp_dropout": MLPConfig(widths=[32], dropout=0.1),
        "cnn": CNNConfig(channels=[4, 8], hidden=16),
        "cnn_bn": CNNConfig(channels=[4, 8], hidden=16, batch_norm=True),
        "mlp_bn": MLPConfig(widths=[32, 32], dropout=0.1, batch_norm=True),
        "cnn3": CNNConfig(channels=[4, 4, 4], hidden=16, dropout=0.1),
        "resnet8": ResNetConfig(name="resnet8", depth=8, width=4),
        "resnet20": ResNetConfig(),
        "gpt": GPTConfig(n_layer=2, n_head=2, n_embd=16),
    }[name]


def make_input(meta: Meta, batch: int = 4, gen: torch.Generator | None = None) -> torch.Tensor:
    if meta.task == "lm":
        return torch.randint(0, meta.num_classes, (batch, *meta.input_shape), generator=gen)
    return torch.randn(batch, *meta.input_shape, generator=gen)


CASES = [
    ("mlp", DIGITS), ("mlp", MNIST), ("mlp", CIFAR), ("mlp", SYNTH), ("mlp_dropout", SYNTH),
    ("cnn", DIGITS), ("cnn", MNIST), ("cnn", CIFAR), ("cnn3", DIGITS), ("cnn3", MNIST),
    ("cnn_bn", DIGITS), ("cnn_bn", CIFAR), ("mlp_bn", SYNTH),
    ("resnet8", DIGITS), ("resnet8", MNIST), ("resnet8", CIFAR), ("resnet20", CIFAR),
    ("gpt", TEXT),
]
IDS = [f"{m}-{'x'.join(map(str, meta.input_shape))}" for m, meta in CASES]


def test_registry_names():
    assert MODELS.names() == ["cnn", "gpt", "mlp", "resnet", "transformer"]
    with pytest.raises(KeyError, match="model.name: unknown 'vgg'"):
        build_model(MLPConfig(name="vgg"), SYNTH)


@pytest.mark.parametrize("name,meta", CASES, ids=IDS)
def test_forward_shape(name, meta):
    torch.manual_seed(0)
    model = build_model(small(name), meta)
    x = make_input(meta, batch=3)
    model.eval()
    with torch.no_grad():
        out = model(x)
    if meta.task == "lm":
        assert out.shape == (3, meta.input_shape[0], meta.num_classes)
        # shorter sequences work too
        assert model(x[:, :5]).shape == (3, 5, meta.num_classes)
    else:
        assert out.shape == (3, meta.num_classes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_resnet_names_dispatch_on_prefix():
    m = build_model(ResNetConfig(name="resnet32", depth=32), CIFAR)
    blocks = sum(1 for mod in m.modules() if type(mod).__name__ == "BasicBlock")
    assert blocks == 15  # 3 stages × n=5


def test_resnet20_param_count():
    n = num_params(build_model(ResNetConfig(), CIFAR))
    assert 260_000 <= n <= 280_000, n
    # option-A shortcuts are parameter-free: only convs, BNs and the classifier have parameters
    m = build_model(ResNetConfig(), CIFAR)
    kinds = {type(mod) for mod in m.modules() if any(True for _ in mod.parameters(recurse=False))}
    assert kinds == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}


def test_mlp_20m_param_count():
    torch.manual_seed(0)
    m = build_model(MLPConfig(widths=[3072, 3072, 3072]), SYNTH)
    n = num_params(m)
    assert 10_000_000 <= n <= 25_000_000, n
    assert n == (64 * 3072 + 3072) + 2 * (3072 * 3072 + 3072) + (3072 * 10 + 10)


@pytest.mark.parametrize("n_layer,n_embd,block,vocab", [(2, 16, 16, 50), (4, 128, 64, 96)])
def test_gpt_param_count_formula(n_layer, n_embd, block, vocab):
    meta = Meta("lm", (block,), vocab)
    m = build_model(GPTConfig(n_layer=n_layer, n_head=4, n_embd=n_embd), meta)
    d = n_embd
    expected = vocab * d + block * d + n_layer * (12 * d * d + 13 * d) + 2 * d
    assert num_params(m) == expected
    assert m.lm_head.weight is m.wte.weight  # tied


def test_cnn_flat_size_and_pool_skip():
    m = build_model(CNNConfig(channels=[4, 4, 4], hidden=16), DIGITS)
    pools = sum(isinstance(mod, nn.MaxPool2d) for mod in m.modules())
    assert pools == 2  # 8 → 4 → 2, third pool skipped
    assert m.flat_features == 4 * 2 * 2
    m = build_model(CNNConfig(channels=[32, 64]), MNIST)
    assert m.flat_features == 64 * 7 * 7


def test_batch_norm_layout_and_param_count():
    """model.batch_norm: conv/Linear (no bias) → BN → ReLU for every layer but the output one."""
    plain = build_model(CNNConfig(channels=[4, 8], hidden=16), DIGITS)
    m = build_model(CNNConfig(channels=[4, 8], hidden=16, batch_norm=True), DIGITS)
    kinds = [type(x).__name__ for x in (*m.features, *m.classifier)]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                     "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                     "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.features[0].bias is None and m.features[4].bias is None
    assert m.classifier[0].bias is None and m.classifier[3].bias is not None  # logits keep theirs
    # each BN adds γ, β and drops the layer's bias: +1 parameter per channel
    assert num_params(m) == num_params(plain) + 4 + 8 + 16
    mlp = build_model(MLPConfig(widths=[32, 16], batch_norm=True), SYNTH)
    assert [type(x).__name__ for x in mlp.net] == ["Linear", "BatchNorm1d", "ReLU", "Linear",
                                                   "BatchNorm1d", "ReLU", "Linear"]
    assert num_params(mlp) == num_params(build_model(MLPConfig(widths=[32, 16]), SYNTH)) + 32 + 16
    # train mode normalizes with the batch statistics: per-channel mean 0 after the first BN
    m.train()
    h = m.features[1](m.features[0](torch.randn(16, 1, 8, 8)))
    assert h.mean(dim=(0, 2, 3)).abs().max() < 1e-5


@pytest.mark.parametrize("cfg", [MLPConfig, CNNConfig], ids=["mlp", "cnn"])
def test_batch_norm_must_be_a_bool(cfg):
    with pytest.raises(ConfigError) as e:
        cfg(batch_norm="yes")
    assert str(e.value) == "model.batch_norm: must be true or false; got 'yes'"


@pytest.mark.parametrize("name,meta", CASES, ids=IDS)
def test_same_seed_same_params(name, meta):
    torch.manual_seed(123)
    a = build_model(small(name), meta)
    torch.manual_seed(123)
    b = build_model(small(name), meta)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    torch.manual_seed(124)
    c = build_model(small(name), meta)
    assert any(not torch.equal(sa[k], v) for k, v in c.state_dict().items()
               if v.is_floating_point())


def _loss(model, meta, x, y):
    out = model(x)
    if meta.task == "lm":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


def _targets(meta, x, gen=None):
    if meta.task == "lm":
        return (x + 1) % meta.num_classes  # next token of an "add one" sequence
    return torch.randint(0, meta.num_classes, (x.shape[0],), generator=gen)


@pytest.mark.parametrize("name,meta", CASES, ids=IDS)
def test_backward_finite_grads(name, meta):
    torch.manual_seed(0)
    model = build_model(small(name), meta)
    model.train()
    x = make_input(meta, batch=4)
    loss = _loss(model, meta, x, _targets(meta, x))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_gpt_causal():
    torch.manual_seed(0)
    model = build_model(GPTConfig(n_layer=2, n_head=2, n_embd=16), TEXT).eval()
    x = make_input(TEXT, batch=2)
    with torch.no_grad():
        base = model(x)
        for t in (0, 5, 15):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 7) % TEXT.num_classes
            out = model(x2)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.equal(out[:, t], base[:, t]), t


def test_cnn_on_non_image_data_raises():
    with pytest.raises(ConfigError) as e:
        build_model(CNNConfig(), SYNTH)
    msg = str(e.value)
    assert e.value.key == "model"
    assert msg.startswith("model: model=cnn needs image data (C,H,W)")
    assert "got input shape (64,)" in msg
    assert "use model=mlp or data=digits/mnist/cifar10" in msg


def test_resnet_on_non_image_data_raises():
    with pytest.raises(ConfigError, match=r"model=resnet20 needs image data \(C,H,W\)"):
        build_model(ResNetConfig(), SYNTH)


def test_gpt_on_classify_data_raises():
    with pytest.raises(ConfigError) as e:
        build_model(GPTConfig(), DIGITS)
    assert e.value.key == "model"
    assert str(e.value).startswith("model: model=gpt needs language-model data (data=text)")
    assert "got data task 'classify'" in str(e.value)


@pytest.mark.parametrize("cfg", [MLPConfig(), CNNConfig(), ResNetConfig()],
                         ids=["mlp", "cnn", "resnet20"])
def test_classifiers_on_lm_data_raise(cfg):
    with pytest.raises(ConfigError, match=rf"model={cfg.name} needs classification data; "
                                          r"got data task 'lm'"):
        build_model(cfg, TEXT)


def test_gpt_rejects_too_long_sequence():
    model = build_model(GPTConfig(n_layer=1, n_head=1, n_embd=8), TEXT)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


OVERFIT = [
    ("mlp", SYNTH, 1e-3), ("cnn", DIGITS, 3e-3), ("cnn_bn", DIGITS, 3e-3), ("resnet8", DIGITS, 1e-2),
    ("gpt", TEXT, 1e-2),
]


@pytest.mark.parametrize("name,meta,lr", OVERFIT, ids=[c[0] for c in OVERFIT])
def test_overfit_tiny_batch(name, meta, lr):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build_model(small(name), meta)
    model.train()
    x = make_input(meta, batch=32, gen=gen)
    y = _targets(meta, x, gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(100):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, meta, x, y)
        if first is None:
            first = loss.item()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = _loss(model, meta, x, y).item()
    assert final < 0.5 * first, (first, final)


# ------------------------------------------------------------------ model=transformer
def test_transformer_encoder_is_bidirectional_and_built_from_torch_layers():
    from dqt.train.models import TransformerConfig

    meta = Meta("tokens", (12,), 20)
    torch.manual_seed(0)
    model = build_model(TransformerConfig(n_layer=2, n_head=2, n_embd=16), meta).eval()
    assert sum(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()) == 2
    x = torch.randint(20, (3, 12))
    with torch.no_grad():
        base = model(x)
        assert base.shape == (3, 12, 20)
        x2 = x.clone()
        x2[:, 11] = (x2[:, 11] + 1) % 20
        assert not torch.equal(model(x2)[:, 0], base[:, 0])  # position 0 sees the last token


def test_transformer_refuses_next_token_data():
    from dqt.train.models import TransformerConfig

    with pytest.raises(ConfigError) as e:
        build_model(TransformerConfig(), Meta("lm", (8,), 20))
    assert str(e.value).startswith("model: model=transformer is a bidirectional encoder")

"""Model zoo: MLP, LeNet-style CNN, CIFAR ResNet, a small character GPT and a bidirectional
token encoder built from ``nn.TransformerEncoderLayer``.

:func:`build_model` takes the typed model config (``MLPConfig`` ..., defined below) and the data
set's metadata (any object with ``task``, ``input_shape`` and ``num_classes``) and returns an
``nn.Module`` whose ``forward`` returns logits only. Layers are plain ``nn.Linear`` /
``nn.Conv2d`` modules so quantization-aware training can swap them in place.

Construction is deterministic given ``torch.manual_seed`` (only torch's RNG is used), touches
no accelerator and prints nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from omegaconf import MISSING

from dqt.errors import ConfigError, check, check_bool
from dqt.registry import Registry


# --------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class MLPConfig(ModelConfig):
    """Fully connected net: input (flattened) → widths... → classes, ReLU between layers;
    ``batch_norm``: BatchNorm1d after each hidden Linear (before the ReLU)."""

    name: str = "mlp"
    widths: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check(len(self.widths) > 0 and all(w > 0 for w in self.widths), "model.widths",
              f"must be a non-empty list of positive ints; got {list(self.widths)}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")
        check_bool(self.batch_norm, "model.batch_norm")


@dataclass
class CNNConfig(ModelConfig):
    """LeNet-style CNN: [conv5x5 → ReLU → maxpool2] per entry of ``channels``, then FC;
    ``batch_norm``: BatchNorm after each conv and the hidden Linear (before the ReLU)."""

    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check(len(self.channels) > 0 and all(c > 0 for c in self.channels), "model.channels",
              f"must be a non-empty list of positive ints; got {list(self.channels)}")
        check(self.hidden > 0, "model.hidden", f"must be > 0; got {self.hidden}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")
        check_bool(self.batch_norm, "model.batch_norm")


@dataclass
class ResNetConfig(ModelConfig):
    """CIFAR-style ResNet (He et al. 2016, §4.2): depth = 6n+2, widths 16/32/64 × ``width``/16."""

    name: str = "resnet20"
    depth: int = 20
    width: int = 16

    def __post_init__(self) -> None:
        check(self.depth >= 8 and (self.depth - 2) % 6 == 0, "model.depth",
              f"must be 6n+2 (20, 32, 44, 56, ...); got {self.depth}")
        check(self.width > 0, "model.width", f"must be > 0; got {self.width}")


@dataclass
class GPTConfig(ModelConfig):
    """Small GPT-style character transformer (pre-LN, causal self-attention, tied embeddings)."""

    name: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check(self.n_layer > 0, "model.n_layer", f"must be > 0; got {self.n_layer}")
        check(self.n_head > 0, "model.n_head", f"must be > 0; got {self.n_head}")
        check(self.n_embd > 0 and self.n_embd % max(self.n_head, 1) == 0, "model.n_embd",
              f"must be a positive multiple of model.n_head={self.n_head}; got {self.n_embd}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")

__all__ = ["MODELS", "build_model", "num_params", "MLP", "LeNetCNN", "CifarResNet", "BasicBlock",
           "GPT", "GPTBlock", "CausalSelfAttention", "TokenEncoder"]

MODELS: Registry[Callable[[Any, Any], nn.Module]] = Registry("model.name")


@dataclass
class TransformerConfig(ModelConfig):
    """A bidirectional encoder built from PyTorch's own ``nn.TransformerEncoderLayer``
    (pre-LN, GELU), with token and learned position embeddings and a per-token classifier:
    the kind of model users assemble themselves. Trains on token data (``data=sort``)."""

    name: str = "transformer"
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check(self.n_layer > 0, "model.n_layer", f"must be > 0; got {self.n_layer}")
        check(self.n_head > 0, "model.n_head", f"must be > 0; got {self.n_head}")
        check(self.n_embd > 0 and self.n_embd % max(self.n_head, 1) == 0, "model.n_embd",
              f"must be a positive multiple of model.n_head={self.n_head}; got {self.n_embd}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")


def num_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _registry_name(name: str) -> str:
    return "resnet" if name.startswith("resnet") else name


def build_model(cfg: Any, meta: Any) -> nn.Module:
    """Build the model named by ``cfg.name`` for data described by ``meta``.

    ``resnet20``, ``resnet32``, ... all map to the ResNet builder (depth from ``cfg.depth``).
    Raises :class:`~dqt.config.ConfigError` (key ``model``) when the model does not fit the data.
    """
    return MODELS.get(_registry_name(str(cfg.name)))(cfg, meta)


# --------------------------------------------------------------------------- checks
def _require_classify(name: str, meta: Any) -> None:
    if meta.task != "classify":
        raise ConfigError(
            "model",
            f"model={name} needs classification data; got data task '{meta.task}'; "
            "use model=gpt for language-model data (data=text)")


def _require_image(name: str, meta: Any) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in meta.input_shape)
    if len(shape) != 3:
        raise ConfigError(
            "model",
            f"model={name} needs image data (C,H,W) such as data=digits/mnist/cifar10; "
            f"got input shape {shape}; use model=mlp or data=digits/mnist/cifar10")
    return shape  # type: ignore[return-value]


# --------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Multi-layer perceptron (Rumelhart, Hinton & Williams 1986): flatten → [Linear (→ BatchNorm)
    → ReLU (→ Dropout)] per hidden width → Linear to the classes. PyTorch's default
    (Kaiming-uniform) initialisation.

    ``batch_norm``: a ``BatchNorm1d`` after every hidden Linear, before the ReLU (Ioffe & Szegedy
    2015), and those Linears lose their bias (BN's β replaces it). This is the layout the
    binary / low-bit papers assume (BNN, XNOR-Net, DoReFa-Net all normalize the output of each
    quantized layer before the next activation quantizer); the output Linear has no BN."""

    def __init__(self, in_features: int, widths: list[int], num_classes: int,
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for w in widths:
            layers.append(nn.Linear(prev, int(w), bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(w)))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = int(w)
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


@MODELS.register("mlp")
def _build_mlp(cfg: Any, meta: Any) -> nn.Module:
    _require_classify("mlp", meta)
    in_features = math.prod(int(s) for s in meta.input_shape)
    return MLP(in_features, list(cfg.widths), int(meta.num_classes), float(cfg.dropout),
               bool(getattr(cfg, "batch_norm", False)))


# --------------------------------------------------------------------------- CNN
class LeNetCNN(nn.Module):
    """LeNet-style convolutional net (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based
    learning applied to document recognition"), modernised with ReLU and max-pooling:
    [Conv5x5(pad 2) (→ BatchNorm) → ReLU → MaxPool2] per entry of ``channels`` (the pool is
    skipped once the feature map would shrink below 2×2, so 8×8 digits work), then flatten →
    Linear(hidden) (→ BatchNorm) → ReLU (→ Dropout) → Linear to the classes.

    ``batch_norm``: a BatchNorm after every conv and after the hidden Linear, before the ReLU
    (Ioffe & Szegedy 2015), those layers without bias. BN is the layer registered right after
    its conv in ``features``, so ``qat.fold_bn`` pairs them (``dqt.quant.bn_fold``). This is the
    conv → BN → activation layout of the low-bit papers (BNN, XNOR-Net, DoReFa-Net's SVHN net)."""

    def __init__(self, in_shape: tuple[int, int, int], channels: list[int], hidden: int,
                 num_classes: int, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out_c in channels:
            layers.append(nn.Conv2d(c, int(out_c), kernel_size=5, padding=2, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(out_c)))
            layers.append(nn.ReLU(inplace=True))
            c = int(out_c)
            if h // 2 >= 2 and w // 2 >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.flat_features = c * h * w
        head: list[nn.Module] = [nn.Linear(self.flat_features, hidden, bias=not batch_norm)]
        if batch_norm:
            head.append(nn.BatchNorm1d(hidden))
        head.append(nn.ReLU(inplace=True))
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@MODELS.register("cnn")
def _build_cnn(cfg: Any, meta: Any) -> nn.Module:
    _require_classify("cnn", meta)
    shape = _require_image("cnn", meta)
    return LeNetCNN(shape, list(cfg.channels), int(cfg.hidden), int(meta.num_classes),
                    float(cfg.dropout), bool(getattr(cfg, "batch_norm", False)))


# --------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut (He et al. 2016). When the shape changes
    the shortcut is option A: stride-2 subsampling plus zero-padded channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad > 0:
            lo = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (He, Zhang, Ren & Sun 2016, "Deep Residual Learning for Image
    Recognition", §4.2): 3×3 conv (w) → 3 stages of n BasicBlocks with widths w, 2w, 4w
    (stride 2 at the first block of stages 2 and 3, shortcut option A) → global average pool →
    Linear.
    Convolutions use Kaiming-normal (fan_out) init, BN starts at γ=1, β=0. ResNet-20 with
    w=16 has ≈0.27 M parameters, as in the paper's Table 6."""

    def __init__(self, in_channels: int, depth: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError("model.depth", f"must be 6n+2 (20, 32, 44, 56, ...); got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages: list[nn.Module] = []
        in_planes = width
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@MODELS.register("resnet")
def _build_resnet(cfg: Any, meta: Any) -> nn.Module:
    name = str(cfg.name)
    _require_classify(name, meta)
    c, _, _ = _require_image(name, meta)
    return CifarResNet(c, int(cfg.depth), int(meta.num_classes), int(cfg.width))


# --------------------------------------------------------------------------- GPT
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.c_proj(y))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (4× GELU MLP)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Small GPT-2-style decoder (Radford et al. 2019, "Language Models are Unsupervised
    Multitask Learners"), following Karpathy's nanoGPT: token + learned positional embeddings,
    ``n_layer`` pre-LN blocks, final LayerNorm and an LM head tied to the token embedding.
    Weights ~ N(0, 0.02), residual projections ~ N(0, 0.02/√(2·n_layer)), biases zero.

    ``forward(idx)`` maps int64 tokens (B, T≤block_size) to logits (B, T, vocab_size).
    Parameter count: V·d + block_size·d + n_layer·(12d² + 13d) + 2d.
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(GPTBlock(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith("attn.c_proj.weight") or name.endswith("mlp.2.weight"):
                    std = 0.02 / math.sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=std)
            elif "ln_" not in name:
                nn.init.zeros_(p)  # biases; LayerNorms keep γ=1, β=0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@MODELS.register("gpt")
def _build_gpt(cfg: Any, meta: Any) -> nn.Module:
    if meta.task != "lm":
        raise ConfigError(
            "model",
            f"model=gpt needs language-model data (data=text); got data task '{meta.task}'; "
            "use model=mlp/cnn/resnet20 for classification data")
    shape = tuple(int(s) for s in meta.input_shape)
    if len(shape) != 1:
        raise ConfigError("model", f"model=gpt needs token sequences (block_size,); "
                                   f"got input shape {shape}")
    return GPT(int(meta.num_classes), shape[0], int(cfg.n_layer), int(cfg.n_head),
               int(cfg.n_embd), float(cfg.dropout))


# --------------------------------------------------------------------------- transformer encoder
class TokenEncoder(nn.Module):
    """Token + learned position embeddings → ``nn.TransformerEncoder`` of pre-LN
    ``nn.TransformerEncoderLayer`` (4× GELU MLP) → LayerNorm → a class per token.
    ``forward(idx)`` maps int64 tokens (B, T ≤ seq_len) to logits (B, T, num_classes)."""

    def __init__(self, vocab: int, seq_len: int, num_classes: int, n_layer: int, n_head: int,
                 n_embd: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(seq_len, n_embd)
        layer = nn.TransformerEncoderLayer(n_embd, n_head, 4 * n_embd, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len {self.seq_len}")
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.encoder(h)))


@MODELS.register("transformer")
def _build_transformer(cfg: Any, meta: Any) -> nn.Module:
    if meta.task != "tokens":
        raise ConfigError(
            "model", f"model=transformer is a bidirectional encoder with a class per input token "
            f"(data=sort); got data task '{meta.task}' (next-token data needs the causal "
            "model=gpt)")
    shape = tuple(int(s) for s in meta.input_shape)
    return TokenEncoder(int(meta.num_classes), shape[0], int(meta.num_classes), int(cfg.n_layer),
                        int(cfg.n_head), int(cfg.n_embd), float(cfg.dropout))

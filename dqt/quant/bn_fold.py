"""BatchNorm folding during QAT (Jacob et al. 2018 §3.2; the variant of PyTorch's
``torch.ao.nn.intrinsic.qat.ConvBn2d``, Krishnamoorthi 2018 §3.2.2).

For a conv (or Linear) followed by a BatchNorm (γ, β, running μ, σ² = running var + ε), the
*folded* weight W·γ/σ is what gets fake-quantized, so the quantization error seen in training is
the one of the deployed, folded layer::

    out = BN( layer(x, Q(W·γ/σ)) / (γ/σ) + b )

In eval mode BN uses μ, σ and this is exactly layer(x, Q(W·γ/σ)) + β + (b − μ)·γ/σ, the folded
layer; in training BN still normalizes with the batch statistics (and updates μ, σ²).

Pairs are found without tracing: a conv whose *next sibling* (registration order, same parent)
is a BatchNorm with ``num_features == out_channels``, or a Linear whose next sibling is a
``BatchNorm1d`` with ``num_features == out_features`` — true for the repo's ResNet
(``conv1``/``bn1``), for ``model.batch_norm=true`` CNN/MLP and for ``nn.Sequential(conv, bn,
...)``. The pairs are logged by ``prepare``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _out_features(layer: nn.Module, bn: nn.Module) -> int | None:
    """The layer's output channels if ``bn`` can follow it, else None."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels
    if isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
        return layer.out_features
    return None


def find_layer_bn(model: nn.Module) -> dict[nn.Module, tuple[str, nn.Module]]:
    """conv / Linear module → (BN name, BN module) for every one directly followed by its BN."""
    pairs: dict[nn.Module, tuple[str, nn.Module]] = {}
    for parent_name, parent in model.named_modules():
        kids = list(parent.named_children())
        for (_, a), (bn_name, b) in zip(kids, kids[1:]):
            if (isinstance(b, nn.modules.batchnorm._BatchNorm) and b.track_running_stats
                    and _out_features(a, b) == b.num_features):
                pairs[a] = (f"{parent_name}.{bn_name}" if parent_name else bn_name, b)
    return pairs


def fold_factor(bn: nn.Module) -> Tensor:
    """γ/σ with σ = √(running_var + ε) (γ = 1 without affine)."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    return bn.weight * inv if bn.weight is not None else inv


class FoldScale(nn.Module):
    """Parametrization W → W·γ/σ (per output channel). The BN is referenced, not owned."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.__dict__["bn"] = bn

    def forward(self, w: Tensor) -> Tensor:
        f = fold_factor(self.bn)
        return w * f.reshape(-1, *([1] * (w.dim() - 1)))


def unfold_output(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
    """Forward hook of a folded layer: divide by γ/σ again (bias kept outside the division);
    the channel axis is 1 (conv: N, C, ...; Linear before BatchNorm1d: N, C)."""
    bn = module.parametrizations.weight[0].bn
    f = fold_factor(bn).reshape(1, -1, *([1] * (out.dim() - 2))).to(out.dtype)
    if module.bias is None:
        return out / f
    b = module.bias.reshape(1, -1, *([1] * (out.dim() - 2))).to(out.dtype)
    return (out - b) / f + b


def folded_bias(layer: nn.Module, bn: nn.Module) -> Tensor:
    """β + (b − μ)·γ/σ: the bias of the deployed folded conv / Linear."""
    f = fold_factor(bn)
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    return (beta + (b - bn.running_mean) * f).detach()

"""Quantization-aware training (the model side). ``QAT`` maps ``qat.name`` to a function that
attaches quantizers to a model in place; ``none`` leaves it in full precision."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from dqt.registry import Registry

QAT: Registry[Callable[[Any, nn.Module], nn.Module]] = Registry("qat.name")


@QAT.register("none")
def _no_qat(cfg: Any, model: nn.Module) -> nn.Module:
    return model


def apply_qat(cfg: Any, model: nn.Module) -> nn.Module:
    return QAT.get(cfg.name)(cfg, model)

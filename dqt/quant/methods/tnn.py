"""Ternary activations of TNN (Alemdar, Leroy, Prost-Boucle & Pétrot, IJCNN 2017,
arXiv 1609.00222, "Ternary Neural Networks for Resource-Efficient AI Applications").

``tnn_a`` (input activations): every neuron output is one of {−1, 0, 1},

    a_t = −1 if a < −Δ,   0 if |a| ≤ Δ,   +1 if a > Δ        (Δ = ``threshold``, 0.5),

i.e. round(hardtanh(a)) for Δ = ½; ``stochastic: true`` (training only) fires sign(a) with
probability min(|a|, 1) and 0 otherwise — the teacher's stochastic ternarization, whose
expectation is hardtanh(a). Backward: the hardtanh STE g·1{|a| ≤ 1}. The paper's weights are
ternary as well; the ``tnn`` preset takes them from ``twn`` (``dqt.quant.methods.ternary``)
rather than another ternarizer, and turns the models' ReLUs into Hardtanh so the ternary inputs
are signed.

Simplification: TNN trains a full-precision teacher and then a ternary student layer by layer
(the student's thresholds fitted to mimic the teacher); here one network is trained end to end
with the ternary forward pass and the STE, as BNN is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register


@register
class TNNAct(Quantizer):
    name = "tnn_a"
    kinds = ("act",)
    bits = 2

    @dataclass
    class Config(Quantizer.Config):
        threshold: float = 0.5
        """Δ: 0 on |a| ≤ Δ, ±1 beyond, in (0, 1)."""
        stochastic: bool = False
        """Training: fire sign(a) with probability min(|a|, 1) instead."""

        def __post_init__(self) -> None:
            t = self.threshold
            need(0 < t < 1, "threshold", f"must be in (0, 1); got {t}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.threshold, self.stochastic = self.cfg.threshold, self.cfg.stochastic

    def ternary(self, x: Tensor) -> Tensor:
        if self.stochastic and self.training:
            fire = torch.rand_like(x) < x.abs().clamp(max=1.0)
        else:
            fire = x.abs() > self.threshold
        return torch.sign(x) * fire.to(x.dtype)

    def quantize(self, x: Tensor) -> Tensor:
        ht = x.clamp(-1.0, 1.0)
        return self.ternary(x.detach()) - (ht.detach() - ht)

"""Incremental Network Quantization (Zhou, Yao, Guo, Xu & Chen, ICLR 2017, arXiv 1702.03044).

* ``inq`` — the weights of a layer are quantized in stages. At stage s a share σ_s of the layer
  (``schedule``, default the paper's 50 %, 75 %, 87.5 %, 100 %) is in the quantized set: the
  largest-magnitude weights among those not yet quantized are added (weight partition, §2.2)
  until round(σ_s·n) are, and each goes to zero or a power of two of
  P = {±2^n1, …, ±2^n2, 0}, n1 = ⌊log2(4·max|W|/3)⌋, n2 = n1 + 1 − 2^(b−1)/2 (eq. 2–4; the
  rounding is ``pow2``'s, :func:`dqt.quant.methods.log_quant.pow2_codes`, with n1 fixed from
  max|W| at the first stage that quantizes anything). Quantized weights are frozen: the forward
  pass uses their stored value and their gradient is zero (the paper's mask T, eq. 5–6); the
  others are retrained in full precision until the next stage.

  Schedule: stage s starts after optimizer step s·``stage_steps`` (stage 0 when the quantizer is
  attached). The step count is the quantizer's own buffer, advanced by ``after_step`` (called by
  ``dqt.quant.qat_step`` after every optimizer step on every rank, checkpointed with the model),
  and the partition reads the layer's weight after that step, identical on every rank — so the
  stage and the frozen set are identical on every rank. The paper starts from a trained fp
  network; to train from scratch, begin the schedule with 0 (a full-precision first stage), as
  ``conf/qat/inq.yaml`` does.

Export: ``log`` codes (as ``pow2``) once every weight is quantized; ``dense`` fp32 before that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Dense, Log, log_value
from dqt.quant.methods.log_quant import _LogBase, pow2_codes, pow2_n1
from dqt.quant.methods.weight_sharing import reject_bn_folding

SCHEDULE = (0.5, 0.75, 0.875, 1.0)


@register
class INQ(_LogBase):
    name = "inq"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 5
        """Bit-width b of the power-of-two levels (as ``pow2``), 2..8."""
        schedule: list[float] = field(default_factory=lambda: list(SCHEDULE))
        """The share of the weights quantized at each stage: non-decreasing, in [0, 1]."""
        stage_steps: int = 75
        """Optimizer steps per stage, >= 1."""

        def __post_init__(self) -> None:
            b = self.bits
            need(2 <= b <= 8, "bits", f"must be in [2, 8]; got {b}")
            s = [float(p) for p in self.schedule]
            need(len(s) > 0 and all(0 <= p <= 1 for p in s), "schedule",
                 f"must be a non-empty list of shares in [0, 1]; got {s}")
            need(all(a <= b for a, b in zip(s, s[1:])), "schedule",
                 f"must be non-decreasing (quantized weights stay quantized); got {s}")
            t = self.stage_steps
            need(t >= 1, "stage_steps", f"must be >= 1; got {t}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.bits, self.stage_steps = self.cfg.bits, self.cfg.stage_steps
        self.schedule = [float(p) for p in self.cfg.schedule]
        self.register_buffer("frozen", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("value", torch.zeros(0))
        self.register_buffer("n1", torch.tensor(math.nan))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("stage", torch.full((), -1, dtype=torch.long))

    def init_from(self, w: Tensor) -> None:
        reject_bn_folding(self)
        self.frozen = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        self.value = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        self.advance(w)

    def current_stage(self) -> int:
        return min(int(self.steps) // self.stage_steps, len(self.schedule) - 1)

    @torch.no_grad()
    def advance(self, w: Tensor) -> None:
        """Apply the stage of the current step count if it is a new one."""
        s = self.current_stage()
        if s > int(self.stage):
            self.stage.fill_(s)
            self.freeze(w.detach().float(), self.schedule[s])

    @torch.no_grad()
    def freeze(self, w: Tensor, share: float) -> None:
        """Quantize and freeze the largest-magnitude unfrozen weights until round(share·n) are."""
        n = w.numel()
        m = int(math.floor(share * n + 0.5))
        if m <= int(self.frozen.sum()):
            return
        a = w.abs().reshape(-1).masked_fill(self.frozen.reshape(-1), math.inf)
        order = torch.argsort(a, descending=True, stable=True)
        new = torch.zeros(n, dtype=torch.bool, device=w.device)
        new[order[:m]] = True
        new = new.reshape(w.shape)
        if torch.isnan(self.n1):
            self.n1.copy_(pow2_n1(w.abs().amax()))
        s, e = pow2_codes(w, self.bits, self.n1)
        self.value = torch.where(new & ~self.frozen, log_value(s, e, 2.0, 1.0), self.value)
        self.frozen = new

    def after_step(self, weight: Optional[Tensor]) -> None:
        self.steps += 1
        if weight is not None:
            self.advance(weight)

    def quantize(self, w: Tensor) -> Tensor:
        return torch.where(self.frozen, self.value, w)

    def codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sign, exponent) of the frozen values (exact powers of two; zeros: exponent n1)."""
        v = self.value
        e = (torch.frexp(v).exponent - 1).float()
        return torch.sign(v), torch.where(v != 0, e, self.n1.expand_as(e))

    def encode(self, w: Tensor) -> Log | Dense:
        if bool(self.frozen.all()):
            return super().encode(w)
        return Dense(self.quantize(w.detach().float()).reshape(w.shape[0], -1))

    def storage_bits(self) -> Optional[float]:
        return 8.0

"""AdamW with a frozen variance: what makes lossy gradient compression train under Adam.

Adam divides each coordinate's momentum by the root of its second moment v. When the gradient
it sees went through a few-bit codec, the codec's error enters v as well as m: a stochastic
ternary or 4-bit code is, per coordinate, mostly zero or a full block scale, so v is inflated
by several times for most coordinates and the update direction is mostly the codec's noise
(measured on the character GPT in ``docs/comm.md``). Estimating v on uncompressed gradients
first and then freezing it — the idea of 1-bit Adam (Tang et al., ICML 2021) — leaves Adam a
fixed per-coordinate preconditioner, under which an unbiased codec's noise averages out in the
momentum as it does under SGD.

:class:`FrozenVarianceAdamW` is AdamW (decoupled weight decay, bias correction) that updates v
during the first ``freeze_steps`` steps and keeps it fixed afterwards. Two details keep a fixed
v safe. A coordinate whose v is exactly 0 at the freeze (no gradient yet: a rare token's
embedding row) takes the mean v̂ of its tensor, so it can still learn, at a typical rate; a
tensor with no gradient at all stays put. And the preconditioned momentum u = m̂ / (√v̂ + ε) is
clamped to ±1/√(1 − β₂), the largest |g|/√v Adam itself can produce (its v includes
(1 − β₂)·g² of the current gradient): a frozen v no longer grows when a rarely active
coordinate's gradient does, and without the clamp one such coordinate could take a step of any
size. The clamp is loose on purpose: a codec's noise makes u noisy, and clamping noise tightly
would shrink the signal underneath it.

The state is flat fp32 buffers in parameter order (``exp_avg``, ``exp_avg_sq``) and the step;
:meth:`state_dict` / :meth:`load_state_dict` round-trip it exactly.
:class:`dqt.comm.onebit_adam.OneBitAdam` builds on this class and communicates the momentum
itself.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor


class FrozenVarianceAdamW(torch.optim.Optimizer):
    """AdamW whose second moment is frozen after ``freeze_steps`` steps.

    Args:
        params: parameters or param groups (each group may set ``lr``, ``weight_decay``, ``eps``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        freeze_steps: steps during which v is estimated; from then on it is fixed.
        decoupled: AdamW's decoupled weight decay (True) or Adam's L2 term added to the
            gradient (False).

    With a gradient-compression scheme, run the scheme's uncompressed warm-up for the same
    number of steps (``scheme.warmup_steps``), so v is estimated on exact gradients; the
    trainer does this itself (``optim.freeze_steps``).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, freeze_steps: int = 100,
                 decoupled: bool = True) -> None:
        if not lr > 0:
            raise ValueError(f"optim.lr: must be > 0; got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"optim.betas: must be in [0, 1); got {betas}")
        if freeze_steps < 1:
            raise ValueError(f"optim.freeze_steps: must be >= 1 (the variance is estimated "
                             f"first); got {freeze_steps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.freeze_steps = int(freeze_steps)
        self.decoupled = decoupled
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._sizes = [p.numel() for p in self._params]
        self._offsets = [0]
        for s in self._sizes:
            self._offsets.append(self._offsets[-1] + s)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        device = self._params[0].device if self._params else torch.device("cpu")
        self.step_count = 0
        self.exp_avg = torch.zeros(self._offsets[-1], dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self._denom: Optional[Tensor] = None  # √v̂ + ε once v is frozen
        self._live: Optional[Tensor] = None  # 1 where the frozen v̂ > 0

    average_gradient_term: bool = False
    """After the freeze, what :meth:`average_update` averages: the whole preconditioned
    momentum u = m / (√v̂ + ε) (False), or only its new term (1 − β₁)·g / (√v̂ + ε), added to
    β₁·m / (√v̂ + ε), which every rank already shares (True). The two have the same mean; they
    differ in where a lossy average's error goes. Averaging u puts the whole error into the
    momentum, which carries it on (β₁ per step): right for codecs with error feedback, which
    send it again later. Averaging the term scales the error by 1 − β₁ and lets the momentum
    average it out over about 1/(1 − β₁) steps: right for unbiased codecs without error
    feedback, whose error is fresh noise each step."""

    @property
    def step_bound(self) -> float:
        """1 / √(1 − β₂): the largest |g| / √v Adam itself can produce (its v includes
        (1 − β₂)·g² of the current gradient), the clamp on the preconditioned gradient."""
        return 1 / math.sqrt(1 - self.param_groups[0]["betas"][1])

    @property
    def frozen(self) -> bool:
        """True once v is fixed (from step ``freeze_steps`` on)."""
        return self.step_count >= self.freeze_steps

    # ------------------------------------------------------------------ the step
    def flat_grad(self) -> Tensor:
        """The parameters' gradients in one flat fp32 buffer (zeros where a grad is None)."""
        g = torch.empty_like(self.exp_avg)
        for p, a, b in zip(self._params, self._offsets[:-1], self._offsets[1:]):
            if p.grad is None:
                g[a:b].zero_()
            else:
                g[a:b].copy_(p.grad.reshape(-1))
        return g

    def warm_up_gradient(self, g: Tensor) -> Tensor:
        """The gradient the warm-up steps use (here: as given; averaged by DDP)."""
        return g

    def average_update(self, u: Tensor) -> Tensor:
        """The preconditioned momentum after the freeze, made common to all ranks (here: it
        already is, the gradients were averaged)."""
        return u

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        beta1, beta2 = self.param_groups[0]["betas"]
        g = self.flat_grad()
        if not self.decoupled:  # Adam's L2 term
            for group in self.param_groups:
                for p in group["params"]:
                    if group["weight_decay"]:
                        i = self._index[id(p)]
                        g[self._offsets[i]:self._offsets[i + 1]].add_(
                            p.detach().reshape(-1), alpha=group["weight_decay"])
        m, v = self.exp_avg, self.exp_avg_sq
        if not self.frozen:
            g = self.warm_up_gradient(g)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            u = m / self._denominator(1 - beta2 ** (self.step_count + 1))
        else:
            denom = self._frozen_denominator()
            bound = (1 - beta1 ** (self.step_count + 1)) / math.sqrt(1 - beta2)  # on u = m̂·bc1
            if self.average_gradient_term:
                # only the new term crosses the wire; β₁·m/denom is common to every rank
                t = g.div_(denom).clamp_(-self.step_bound, self.step_bound).mul_(1 - beta1)
                u = torch.div(m, denom).mul_(beta1).add_(self.average_update(t))
                u.clamp_(-bound, bound)
            else:
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                u = m / denom
                u.clamp_(-bound, bound)
                u = self.average_update(u)
            u.mul_(self._live)
            torch.mul(u, denom, out=m)  # the momentum that goes on
        self.step_count += 1
        bc1 = 1 - beta1 ** self.step_count
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                i = self._index[id(p)]
                a, b = self._offsets[i], self._offsets[i + 1]
                if wd and self.decoupled:
                    p.mul_(1 - lr * wd)
                p.add_(u[a:b].view_as(p), alpha=-lr / bc1)
        return loss

    def _denominator(self, bc2: float, v: Optional[Tensor] = None) -> Tensor:
        """√(v / bc2) + ε per coordinate (each param group's ε); v defaults to the state's."""
        denom = ((self.exp_avg_sq if v is None else v) / bc2).sqrt_()
        for group in self.param_groups:
            if group["params"]:
                a = self._offsets[self._index[id(group["params"][0])]]
                denom[a:a + sum(p.numel() for p in group["params"])].add_(group["eps"])
        return denom

    def _frozen_denominator(self) -> Tensor:
        """√v̂ + ε at the freeze; coordinates with v = 0 take their tensor's mean v̂; ``_live``
        is 0 only on tensors that never had a gradient."""
        if self._denom is None:
            beta2 = self.param_groups[0]["betas"][1]
            v = self.exp_avg_sq.clone()
            self._live = torch.ones_like(v)
            for a, b in zip(self._offsets[:-1], self._offsets[1:]):
                part = v[a:b]
                if part.numel() and not bool((part > 0).all()):
                    mean = part.mean()
                    if mean > 0:
                        part.masked_fill_(part == 0, float(mean))
                    else:
                        self._live[a:b] = 0
            self._denom = self._denominator(1 - beta2 ** self.freeze_steps, v)
        return self._denom

    def preconditioner(self, p: Tensor) -> Optional[Tensor]:
        """After the freeze, the scale of ``p``'s gradient in Adam's normalised units: its
        frozen √v̂ + ε (1 on a tensor that never had a gradient), shaped as ``p``; None before
        the freeze or for a parameter this optimizer does not hold.

        A gradient codec divides the gradient by it before encoding and multiplies the decoded
        average back (:meth:`dqt.comm.compressed_scheme.CompressedScheme.set_preconditioner`):
        since v̂ is frozen and equal on every rank this is the same average, but the codec's
        error, shared by a block of values, lands in proportion to each coordinate's step
        instead of being divided by a small √v̂ into a large one."""
        i = self._index.get(id(p))
        if i is None or not self.frozen:
            return None
        denom = self._frozen_denominator()
        a, b = self._offsets[i], self._offsets[i + 1]
        return torch.where(self._live[a:b] > 0, denom[a:b], 1.0).view_as(p)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"step": self.step_count, "freeze_steps": self.freeze_steps,
                "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "param_groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["exp_avg"].shape != self.exp_avg.shape:
            raise ValueError(f"optimizer state has {state['exp_avg'].numel()} values; the "
                             f"model has {self.exp_avg.numel()} parameters")
        if len(state["param_groups"]) != len(self.param_groups):
            raise ValueError("optimizer state has a different number of param groups")
        self.step_count = int(state["step"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self._denom = self._live = None
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)

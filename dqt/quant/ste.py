"""Straight-through estimators (Bengio, Léonard & Courville 2013, "Estimating or propagating
gradients through stochastic neurons"): the forward pass uses the quantized value, the backward
pass pretends the quantizer was (a clipped) identity.

Every helper has the form ``q.detach() − (f(x).detach() − f(x))``: the second term is exactly
+0, so the forward value is *bit for bit* ``q`` (which export relies on) — −0 included, which
``q + (f − f.detach())`` would turn into +0 — and the gradient is that of ``f``. No ``.item()``
and no data-dependent Python control flow.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _through(q: Tensor, f: Tensor) -> Tensor:
    return q.detach() - (f.detach() - f)  # q − (+0) keeps q's sign of zero


def ste(x: Tensor, q: Tensor) -> Tensor:
    """Forward ``q``, backward identity to ``x``."""
    return _through(q, x)


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward (half to even, as tf.round), identity backward."""
    return _through(torch.round(x), x)


def floor_ste(x: Tensor) -> Tensor:
    """floor(x) forward, identity backward."""
    return _through(torch.floor(x), x)


def sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 (tensorpack / BNN convention: every weight is ±1)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def sign_ste_htanh(x: Tensor) -> Tensor:
    """BNN sign with the hardtanh STE: g_r = g_q · 1{|x| ≤ 1} (Hubara et al. 2016)."""
    return _through(sign(x), x.clamp(-1.0, 1.0))


def grad_scale(x: Tensor, g: float | Tensor) -> Tensor:
    """Forward ``x`` (exactly), backward ``g · grad`` — LSQ's ``grad_scale`` (Esser et al. 2020),
    written so the forward value is bit-exact."""
    return _through(x, x * g)

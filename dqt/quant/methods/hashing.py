"""Binary weights learned as inner-product-preserving hashing — BWNH (Hu, Wang & Cheng, AAAI 2018,
arXiv 1802.02733, "From Hashing to CNNs: Training Binary Weight Networks via Hashing").

``bwnh`` (weights): for every output channel n (w = W[n] ∈ R^K, K = in·kh·kw) find b ∈ {±1}^K
and α > 0 minimizing the error of the layer's response on its inputs X (K × rows):

    ‖Xᵀw − α·Xᵀb‖² = (w − αb)ᵀ S (w − αb),      S = X Xᵀ

by the paper's alternating updates, starting from b = sign(w):

* α (closed form): α = bᵀSw / bᵀSb;
* B (discrete, one input coordinate j at a time — a row of the K × N code matrix, for all
  channels at once): b_j = sign((Sw)_j − α·Σ_{i≠j} S_ji b_i) (b_j unchanged where that is 0);

``iters`` sweeps (B, then α; fewer once a sweep changes no bit). With S = I this is BWN exactly: b = sign(w), α = mean|w|.

S comes from the layer's own inputs (``dqt.quant.input_stats``): a forward pre-hook on the layer
records Σ xxᵀ over the batch rows (Linear: every row; Conv2d: every im2col patch, at most 4096 per batch, evenly
strided) and their count while training; ``qat_step`` SUM-reduces them over the ranks and
``commit`` keeps S as an EMA (``momentum``, 0.1) of XXᵀ/rows, plus a ridge 10⁻³·tr(S)/K·I so that
S is definite. S is therefore identical on every rank; it is a non-persistent buffer (neither
exported nor checkpointed: a resumed run starts again from S = I and re-learns it from the next
batch). Layers without recorded inputs (Conv1d/3d, Embedding, before the first step) use S = I.

Backward: identity STE (∂C/∂W = ∂C/∂Ŵ), as the paper's fine-tuning of the full-precision
weights. Simplifications: the paper solves B, α layer by layer from a pretrained network and then
fine-tunes; here B, α are re-solved from the current W and S at every step of QAT.

Export: 1-bit ``affine`` codes [b > 0], zero ½, scale 2α.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Affine
from dqt.quant.input_stats import InputCovariance
from dqt.quant.ste import sign, ste


def hash_binarize(w: Tensor, s: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """(b ∈ {±1} (N, K), α (N,)) from W (N, K) and S (K, K) by the alternating updates.

    Runs in numpy on the CPU (fp32): K sequential coordinate steps per sweep, where torch's
    per-op overhead would dominate."""
    wn = w.detach().cpu().float().numpy()
    sn = s.detach().cpu().float().numpy()
    b = np.where(wn >= 0, 1.0, -1.0).astype(np.float32).T.copy()  # (K, N): row j = coordinate j
    p = sn @ wn.T  # Sw, (K, N)
    q = sn @ b  # Sb
    diag = np.diagonal(sn)

    def alpha() -> np.ndarray:
        num, den = (b * p).sum(0), (b * q).sum(0)
        return np.where(den > 0, num / np.maximum(den, 1e-30), 0.0).clip(min=0).astype(np.float32)

    a = alpha()
    for _ in range(iters):
        changed = False
        for j in range(b.shape[0]):
            v = p[j] - a * (q[j] - diag[j] * b[j])
            new = np.where(v > 0, 1.0, np.where(v < 0, -1.0, b[j])).astype(np.float32)
            delta = new - b[j]
            if delta.any():
                q += sn[:, j:j + 1] * delta[None]
                b[j] = new
                changed = True
        if not changed:  # a fixed point: α and B would not change again
            break
        a = alpha()
    return torch.from_numpy(b.T.copy()).to(w.device), torch.from_numpy(a).to(w.device)


@register
class BWNH(InputCovariance):
    name = "bwnh"
    kinds = ("weight",)
    bits = 1

    @dataclass
    class Config(Quantizer.Config):
        iters: int = 2
        """At most this many sweeps of the B- and α-updates, 1..100."""
        momentum: float = 0.1
        """EMA weight of the new input covariance S, (0, 1]."""

        def __post_init__(self) -> None:
            i, m = self.iters, self.momentum
            need(1 <= i <= 100, "iters", f"must be in [1, 100]; got {i}")
            need(0 < m <= 1, "momentum", f"must be in (0, 1]; got {m}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        self.iters = self.cfg.iters
        self._memo: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None

    # ------------------------------------------------------------ the maths
    def binarize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        n = w.shape[0]
        w2 = w.detach().reshape(n, -1)
        k = w2.shape[1]
        s = self.covariance(k, w.device)
        m = self._memo
        if m is not None and m[0].shape == w2.shape and m[1].shape == s.shape \
                and torch.equal(m[0], w2) and torch.equal(m[1], s):
            return m[2], m[3]
        b, a = hash_binarize(w2, s.to(w2.dtype), self.iters)
        self._memo = (w2.clone(), s.clone(), b, a)
        return b, a

    def quantize(self, w: Tensor) -> Tensor:
        b, a = self.binarize(w)
        codes = (b > 0).to(w.dtype)
        wq = (2 * a)[:, None] * (codes - torch.tensor(0.5))
        return ste(w, wq.reshape(w.shape))

    def encode(self, w: Tensor) -> Affine:
        b, a = self.binarize(w)
        n = w.shape[0]
        return Affine((b > 0).to(torch.uint8), (2 * a).float(), torch.full((n,), 0.5), 1)

"""Product quantization of weights — Q-CNN (Wu, Leng, Wang, Hu & Cheng, CVPR 2016,
arXiv 1512.06473, "Quantized Convolutional Neural Networks for Mobile Devices").

``pq`` (weights): the weight is viewed as (N, C, P) — N outputs, C inputs (channels), P kernel
positions (1 for Linear). The input dimension is split into M = ⌈C / d⌉ subspaces of d =
``sub_dim`` channels (C zero-padded to M·d); for a conv every kernel position p is its own FC-like
(C × N) matrix, as in the paper (§3.3), so there are S = P·M subspaces. In each subspace the N
sub-vectors w_n^(s) ∈ R^d are quantized with a codebook D^(s) of K = 2^``bits`` sub-codewords
found by k-means (Lloyd's algorithm, at most ``iters`` iterations, fewer once no assignment
changes):

    min_{D, B} Σ_n ‖w_n^(s) − D^(s) b_n^(s)‖²,   b_n^(s) one-hot,   Ŵ[n, s] = D^(s)[k_n^(s)]

(K is capped at N). The k-means starts from K distinct sub-vectors chosen by a fixed-seed
permutation, ties go to the lower codeword and an empty cluster keeps its codeword, so the
result is a deterministic function of W: identical on every rank, and recomputed whenever W
changes (every step; memoized for eval). Backward: identity STE (the paper fine-tunes the
remaining layers after quantizing; here the full-precision W keeps training through the STE).

``response: true`` adds the paper's error correction (§3.2, §3.3): the quantized weight is fitted
to the layer's *response* on its inputs, min Σ_n ‖(w_n − ŵ_n)ᵀX‖² = Σ_n e_nᵀ S e_n, by one round
of block coordinate descent over the subspaces starting from the k-means result (see
:func:`error_correct`; each step lowers the objective). S = XXᵀ/rows comes from the layer's own
inputs, SUM-reduced over the ranks (``dqt.quant.input_stats``: identical on every rank, S = I
until the first commit, EMA ``momentum``). With S = I it reduces to k-means steps.

Export: ``pq`` codes (codebooks fp32 (S, K, d), indices int16 (S, N)); decode is the same gather
the forward pass does, so it is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import ProductCodes, pq_decode
from dqt.quant.input_stats import InputCovariance
from dqt.quant.ste import ste

SEED = 0


def as_ncp(w: Tensor) -> Tensor:
    """Weight → (N, C, P): Linear (N, C) → P = 1; Conv (N, C, *k) → P = prod(k)."""
    return w.reshape(w.shape[0], w.shape[1] if w.dim() > 1 else 1, -1)


def subvectors(w: Tensor, d: int) -> Tensor:
    """(N, C, P) → (S = P·M, N, d), C zero-padded to M·d (inverse: ``codes.pq_decode``)."""
    n, c, p = w.shape
    m = -(-c // d)
    w = F.pad(w, (0, 0, 0, m * d - c))
    return w.reshape(n, m, d, p).permute(3, 1, 0, 2).reshape(p * m, n, d)


def kmeans(v: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """Batched Lloyd k-means of v (S, N, d) → (codebook (S, k, d), index (S, N))."""
    s, n, d = v.shape
    k = min(k, n)
    g = torch.Generator().manual_seed(SEED)
    start = torch.randperm(n, generator=g)[:k].to(v.device)
    c = v[:, start].clone()

    def assign(c: Tensor) -> Tensor:
        dist = (v * v).sum(-1, keepdim=True) - 2 * v @ c.transpose(1, 2) \
            + (c * c).sum(-1)[:, None, :]
        return dist.argmin(-1)

    prev = None
    for _ in range(iters):
        idx = assign(c)
        if prev is not None and torch.equal(idx, prev):  # converged: the codebook is final
            return c, idx
        prev = idx
        sums = torch.zeros_like(c).scatter_add_(1, idx[..., None].expand(s, n, d), v)
        cnt = torch.zeros(s, k, device=v.device, dtype=v.dtype).scatter_add_(
            1, idx, torch.ones_like(idx, dtype=v.dtype))
        c = torch.where(cnt[..., None] > 0, sums / cnt.clamp(min=1)[..., None], c)
    return c, assign(c)


def error_correct(w: Tensor, s: Tensor, c: Tensor, idx: Tensor, d: int, iters: int
                  ) -> tuple[Tensor, Tensor]:
    """Q-CNN's error correction: block coordinate descent on Σ_n (w_n − ŵ_n)ᵀ S (w_n − ŵ_n) over
    the subspaces in turn (``iters`` rounds), from the k-means codebooks ``c`` / ``idx``.

    For subspace s (flat indices I), A = S_II and the cross term t_n = Σ_{j∉I} S_Ij e_nj of the
    other subspaces' current errors e = w − ŵ: assign n to argmin_k (w_nI − c_k)ᵀA(w_nI − c_k) +
    2(w_nI − c_k)ᵀt_n, then c_k = mean_{n→k} w_nI + A⁻¹·mean_{n→k} t_n (empty: unchanged)."""
    n, ch, p = w.shape
    m = -(-ch // d)
    kf = ch * p
    sp = torch.eye(m * d * p, dtype=w.dtype, device=w.device)  # padded channels: S = I, no coupling
    sp[:kf, :kf] = s
    wp = F.pad(w, (0, 0, 0, m * d - ch)).reshape(n, m * d * p)  # flat index c·P + pos
    c, idx = c.clone(), idx.clone()
    k = c.shape[1]
    err = wp - pq_decode(c, idx, m * d, p)
    for _ in range(iters):
        for si in range(p * m):
            pos, g = divmod(si, m)
            ii = (torch.arange(g * d, (g + 1) * d, device=w.device) * p + pos)
            a = sp[ii][:, ii]
            t = err @ sp[:, ii] - err[:, ii] @ a  # (N, d)
            u = wp[:, ii][:, None, :] - c[si][None]  # (N, K, d)
            cost = torch.einsum("nkd,de,nke->nk", u, a, u) + 2 * torch.einsum("nkd,nd->nk", u, t)
            j = cost.argmin(-1)
            one = F.one_hot(j, k).to(w.dtype)  # (N, K)
            cnt = one.sum(0)
            mean_w = (one.t() @ wp[:, ii]) / cnt.clamp(min=1)[:, None]
            mean_t = (one.t() @ t) / cnt.clamp(min=1)[:, None]
            new = mean_w + torch.linalg.solve(a, mean_t.t()).t()
            c[si] = torch.where(cnt[:, None] > 0, new, c[si])
            idx[si] = j
            err[:, ii] = wp[:, ii] - c[si][j]
    return c, idx


@register
class ProductQuant(InputCovariance):
    name = "pq"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 4
        """K = 2^bits sub-codewords per subspace, 1..12."""
        sub_dim: int = 4
        """d: input channels per subspace, 1..64."""
        iters: int = 10
        """At most this many k-means iterations, 1..1000."""
        response: bool = False
        """Error correction: fit the layer's response on its inputs, ‖(W − Ŵ)ᵀX‖."""
        momentum: float = 0.1
        """``response``: EMA weight of the new input covariance S, (0, 1]."""

        def __post_init__(self) -> None:
            b, d, i, m = self.bits, self.sub_dim, self.iters, self.momentum
            need(1 <= b <= 12, "bits", f"must be in [1, 12] (K = 2^bits codewords); got {b}")
            need(1 <= d <= 64, "sub_dim", f"must be in [1, 64]; got {d}")
            need(1 <= i <= 1000, "iters", f"must be in [1, 1000]; got {i}")
            need(0 < m <= 1, "momentum", f"must be in (0, 1]; got {m}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.sub_dim, self.iters, self.response = c.bits, c.sub_dim, c.iters, c.response
        self._memo: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None

    @property
    def records(self) -> bool:
        return self.response

    def storage_bits(self) -> Optional[float]:
        return self.bits / self.sub_dim  # index bits per weight (codebooks on top)

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        w = w.detach()
        ncp = as_ncp(w)
        kf = ncp.shape[1] * ncp.shape[2]
        s = self.covariance(kf, w.device) if self.response else torch.zeros(0)
        m = self._memo
        if m is not None and m[0].shape == w.shape and m[1].shape == s.shape \
                and torch.equal(m[0], w) and torch.equal(m[1], s):
            return m[2], m[3]
        c, idx = kmeans(subvectors(ncp, self.sub_dim), 2 ** self.bits, self.iters)
        if self.response:
            c, idx = error_correct(ncp, s.to(w.dtype), c, idx, self.sub_dim, 1)
        self._memo = (w.clone(), s.clone(), c, idx)
        return c, idx

    def quantize(self, w: Tensor) -> Tensor:
        c, idx = self.codes(w)
        ncp = as_ncp(w)
        return ste(w, pq_decode(c, idx, ncp.shape[1], ncp.shape[2]).reshape(w.shape))

    def encode(self, w: Tensor) -> ProductCodes:
        c, idx = self.codes(w)
        ncp = as_ncp(w)
        return ProductCodes(c, idx.to(torch.int16), ncp.shape[1], ncp.shape[2])

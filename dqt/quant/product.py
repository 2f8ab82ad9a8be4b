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

Not implemented: the paper's error-corrected variant (§3.2/3.3, minimizing the layer-response
error ‖(W − Ŵ)ᵀX‖ with a calibration batch) — the weight-space objective above only.

Export: ``pq`` codes (codebooks fp32 (S, K, d), indices int16 (S, N)); decode is the same gather
the forward pass does, so it is bit-exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.codes import ProductCodes, pq_decode
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


@register
class ProductQuant(Quantizer):
    name = "pq"
    kinds = ("weight",)

    def __init__(self, kind: str, bits: int = 4, sub_dim: int = 4, iters: int = 10) -> None:
        super().__init__(kind)
        self.bits, self.sub_dim, self.iters = bits, sub_dim, iters
        self._memo: Optional[tuple[Tensor, Tensor, Tensor]] = None

    @classmethod
    def check(cls, kind: str, args: dict[str, Any]) -> None:
        b, d, i = args.get("bits"), args.get("sub_dim"), args.get("iters")
        need(b is None or 1 <= b <= 12, "bits", f"must be in [1, 12] (K = 2^bits codewords); got {b}")
        need(d is None or 1 <= d <= 64, "sub_dim", f"must be in [1, 64]; got {d}")
        need(i is None or 1 <= i <= 1000, "iters", f"must be in [1, 1000]; got {i}")

    def storage_bits(self) -> Optional[float]:
        return self.bits / self.sub_dim  # index bits per weight (codebooks on top)

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        w = w.detach()
        if self._memo is not None and self._memo[0].shape == w.shape and torch.equal(self._memo[0], w):
            return self._memo[1], self._memo[2]
        c, idx = kmeans(subvectors(as_ncp(w), self.sub_dim), 2 ** self.bits, self.iters)
        self._memo = (w.clone(), c, idx)
        return c, idx

    def quantize(self, w: Tensor) -> Tensor:
        c, idx = self.codes(w)
        ncp = as_ncp(w)
        return ste(w, pq_decode(c, idx, ncp.shape[1], ncp.shape[2]).reshape(w.shape))

    def encode(self, w: Tensor) -> ProductCodes:
        c, idx = self.codes(w)
        ncp = as_ncp(w)
        return ProductCodes(c, idx.to(torch.int16), ncp.shape[1], ncp.shape[2])

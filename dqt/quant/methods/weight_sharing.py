"""Weight sharing by k-means — Deep Compression (Han, Mao & Dally, ICLR 2016, arXiv 1510.00149
§3, the seed's "Deep Compression").

* ``kmeans`` — the n weights of a layer are clustered into k = 2^bits clusters c_1..c_k that
  minimize the within-cluster sum of squares argmin_C Σ_j Σ_{w ∈ c_j} |w − c_j|² (Lloyd's
  algorithm on the 1-D values, until no assignment changes, at most 100 iterations), and the
  forward pass uses the shared values W_q[i] = c[idx[i]].

  Centroid initialization (``centroid_init``, the paper's §3.2):
  ``linear`` (default, the paper's best: it keeps the rare large weights) c_j = min W +
  (j − 1)·(max W − min W)/(k − 1); ``density`` c_j = F⁻¹((j − 1)/(k − 1)), F the weights'
  empirical CDF (equal steps on its y axis, linear interpolation between order statistics);
  ``random`` k weights drawn without replacement by a generator seeded with 0 (identical on
  every rank).

  Fine-tuning (§3.3, eq. 3): ∂L/∂c_j = Σ_{i: idx_i = j} ∂L/∂W_q[i]. The centroids are
  quantizer parameters (their own param group, ``qat.quantizer_lr_mult``, like TTQ's W_p/W_n);
  the indices are fixed, and the layer's own weight gets a zero gradient once clustered (it no
  longer enters the forward pass; it stays in the graph so DDP sees every parameter used).

  When: the assignment is computed **once**, after optimizer step ``cluster_step`` (0: when the
  quantizer is attached, from the initial or loaded weights — the paper clusters a trained
  network). Until then the layer is full precision (identity, and the centroids get a zero
  gradient) — the paper's "train" stage before sharing. Clustering reads the layer's weight
  after an optimizer step, which DDP keeps identical on every rank, so the clusters are
  identical too. No re-clustering.

Storage (§3): n indices of log2 k bits and k fp32 centroids, r = 32n / (n·log2 k + 32k)
(:func:`compression_ratio`; the seed: 8 bits, k = 256, r = 32n/(8n + 256·32) ≈ 4). Export:
``shared_codebook`` (indices packed at 1/2/4/8 bits + the fp32 codebook; the JSON adds the size of the
Huffman-coded indices, §4); before clustering ``dense``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Dense, SharedCodebook

CENTROID_INITS = ("linear", "density", "random")
MAX_ITERS = 100


def compression_ratio(n: int, k: int) -> float:
    """Deep Compression's r = 32n / (n·log2 k + 32k) for n weights shared by k centroids."""
    return 32 * n / (n * math.log2(k) + 32 * k)


def init_centroids(w: Tensor, k: int, method: str) -> Tensor:
    """k initial centroids (fp64) of the values of ``w`` (§3.2)."""
    x = w.detach().double().reshape(-1)
    if method == "linear":
        return torch.linspace(float(x.min()), float(x.max()), k, dtype=torch.float64)
    if method == "density":
        xs = torch.sort(x).values
        pos = torch.linspace(0, 1, k, dtype=torch.float64) * (xs.numel() - 1)
        lo = pos.floor().long()
        hi = pos.ceil().long()
        return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])
    if method == "random":
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(x.numel(), generator=g)
        return x[perm.repeat(-(-k // x.numel()))[:k]]
    raise ValueError(f"centroid_init must be one of {CENTROID_INITS}; got {method!r}")


def nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centroid for every value of ``x`` (ties: the smaller centroid)."""
    order = torch.argsort(c, stable=True)
    cs = c[order]
    j = torch.bucketize(x, (cs[1:] + cs[:-1]) / 2)
    return order[j]


def kmeans_1d(w: Tensor, c: Tensor, iters: int = MAX_ITERS) -> tuple[Tensor, Tensor]:
    """Lloyd's algorithm from centroids ``c``: (centroids fp32 (k,), indices int64 like ``w``).
    An empty cluster keeps its centroid."""
    x = w.detach().double().reshape(-1)
    c = c.double().clone()
    k = c.numel()
    idx = nearest(x, c)
    for _ in range(iters):
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, x)
        cnt = torch.bincount(idx, minlength=k)
        c = torch.where(cnt > 0, sums / cnt.clamp(min=1), c)
        new = nearest(x, c)
        if torch.equal(new, idx):
            break
        idx = new
    return c.float(), idx.reshape(w.shape)


class _SharedWeights(torch.autograd.Function):
    """W_q = c[idx]; ∂L/∂c_j = Σ_{idx_i = j} ∂L/∂W_q[i]; ∂L/∂W = 0."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, c: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.k = c.numel()
        return c[idx]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        (idx,) = ctx.saved_tensors
        gc = torch.zeros(ctx.k, dtype=g.dtype, device=g.device)
        return torch.zeros_like(g), gc.index_add_(0, idx.reshape(-1), g.reshape(-1)), None


class _BeforeClustering(torch.autograd.Function):
    """Identity in W; the centroids stay in the graph with a zero gradient (DDP)."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, c: Tensor) -> Tensor:
        ctx.c_shape = c.shape
        return w.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        return g, torch.zeros(ctx.c_shape, dtype=g.dtype, device=g.device)


def reject_bn_folding(q: Quantizer) -> None:
    """Quantizers whose state is computed from the layer's own weight cannot sit behind a
    BatchNorm fold (W·γ/σ changes with per-rank BN statistics)."""
    layer = q.layer
    if layer is not None and parametrize.is_parametrized(layer, "weight"):
        raise ValueError(f"qat.fold_bn: {q.name} keeps state computed from the layer's own "
                         "weight and cannot quantize a BN-folded weight; set qat.fold_bn=false")


@register
class KMeans(Quantizer):
    name = "kmeans"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 4
        """k = 2^bits shared centroids, 1..8."""
        centroid_init: str = "linear"
        """Initial centroids: linear, density or random (the paper's §3.2)."""
        cluster_step: int = 0
        """Cluster after this optimizer step, >= 0 (0: when the quantizer is attached)."""

        def __post_init__(self) -> None:
            b, i, s = self.bits, self.centroid_init, self.cluster_step
            need(1 <= b <= 8, "bits", f"must be in [1, 8] (k = 2^bits ≤ 256); got {b}")
            need(i in CENTROID_INITS, "centroid_init",
                 f"must be one of {', '.join(CENTROID_INITS)}; got {i!r}")
            need(s >= 0, "cluster_step", f"must be >= 0; got {s}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.centroid_init, self.cluster_step = c.bits, c.centroid_init, c.cluster_step
        self.centroids = nn.Parameter(torch.zeros(2 ** c.bits))
        self.register_buffer("index", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("clustered", torch.zeros((), dtype=torch.bool))

    def init_from(self, w: Tensor) -> None:
        reject_bn_folding(self)
        self.index = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        if self.cluster_step == 0:
            self.cluster(w)

    @torch.no_grad()
    def cluster(self, w: Tensor) -> None:
        c, idx = kmeans_1d(w.float().cpu(), init_centroids(w.cpu(), 2 ** self.bits,
                                                             self.centroid_init))
        self.centroids.copy_(c.to(self.centroids.device))
        self.index = idx.to(torch.uint8).to(w.device)
        self.clustered.fill_(True)

    def after_step(self, weight: Optional[Tensor]) -> None:
        self.steps += 1
        if weight is not None and not bool(self.clustered) and int(self.steps) >= self.cluster_step:
            self.cluster(weight.detach())

    def quantize(self, w: Tensor) -> Tensor:
        if not bool(self.clustered):
            return _BeforeClustering.apply(w, self.centroids)
        return _SharedWeights.apply(w, self.centroids.float(), self.index.long())

    def encode(self, w: Tensor) -> SharedCodebook | Dense:
        n = w.shape[0]
        if not bool(self.clustered):
            return Dense(w.detach().float().reshape(n, -1))
        return SharedCodebook(self.index.reshape(n, -1), self.centroids.detach().float(), self.bits)

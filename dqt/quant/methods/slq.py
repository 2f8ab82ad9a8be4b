"""Single-level quantization (Xu, Wang, Wang, Liu, Liu & Tian, "Deep Neural Network Compression
with Single and Multiple Level Quantization", AAAI 2018, arXiv 1803.03289; the survey's SLQ).

* ``slq`` — the weights of a layer end on K = 2^bits shared centroids, reached in stages. At
  stage s the quantized set holds m_s = round(σ_s·K) clusters (``schedule``, a share of the K
  clusters, default 0 (full precision), 50 %, 75 %, 87.5 %, 100 %). Entering a stage with
  m_{s−1} clusters already quantized:

  1. the n' weights not yet quantized are clustered by k-means into K − m_{s−1} clusters
     (Lloyd's algorithm from linearly spaced centroids, as ``kmeans``:
     :func:`dqt.quant.methods.weight_sharing.kmeans_1d`);
  2. each cluster c_j gets its quantization loss E_j = Σ_{w ∈ c_j} (w − c_j)² (the paper's
     loss-based partition);
  3. the m_s − m_{s−1} clusters of lowest E_j are quantized: their weights are set to their
     centroid and frozen, the centroid joins the layer's codebook; the other weights stay
     full precision and are retrained until the next stage, where they are re-clustered.

  At the last stage (σ = 1) every remaining cluster is quantized, so every weight of the layer is
  one of K centroids. A frozen weight's forward value is its stored centroid and its gradient is
  zero; the unfrozen ones get the identity gradient.

  Schedule: stage s starts after optimizer step ``start_step`` + s·``stage_steps``. The step
  count is the quantizer's own buffer, advanced by ``after_step`` (after every optimizer step, on
  every rank, checkpointed); clustering reads the layer's weight after the step, which DDP keeps
  identical on every rank, so the codebook and the frozen set are identical on every rank.

  Multiple-level quantization (MLQ, the same paper) quantizes along the depth as well as the
  width: the layers enter the schedule one after another, so the deeper layers retrain while
  the shallower ones are already being quantized. ``layer_steps`` > 0 does this: the ℓ-th layer
  with this quantizer (ℓ = 0, 1, …, in the model's module order, as ``prepare`` numbers them)
  starts its schedule after step ``start_step`` + ℓ·``layer_steps`` (preset ``qat=mlq``).

Departures from the paper: the paper quantizes a trained network and retrains between stages
until the accuracy recovers; here each stage lasts a fixed ``stage_steps`` and the schedule may
start from scratch with a full-precision stage (share 0). An empty cluster has no loss to rank:
it is quantized last (E = +∞), so a stage never spends a codebook slot on it while a non-empty
cluster is left. The centroids stay fixed once quantized (no centroid fine-tuning).

Export: ``shared_codebook`` (indices into the K centroids) once every weight is quantized;
``dense`` fp32 before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from dqt.quant.base import Quantizer, need, register
from dqt.quant.export.codes import Dense, SharedCodebook
from dqt.quant.methods.weight_sharing import init_centroids, kmeans_1d, reject_bn_folding

SCHEDULE = (0.0, 0.5, 0.75, 0.875, 1.0)


def cluster_losses(x: Tensor, c: Tensor, idx: Tensor) -> Tensor:
    """E_j = Σ_{idx_i = j} (x_i − c_j)² in fp64 (+∞ for an empty cluster)."""
    x, c = x.double().reshape(-1), c.double()
    idx = idx.reshape(-1)
    e = torch.zeros(c.numel(), dtype=torch.float64).index_add_(0, idx, (x - c[idx]) ** 2)
    cnt = torch.bincount(idx, minlength=c.numel())
    return torch.where(cnt > 0, e, torch.full_like(e, math.inf))


@register
class SLQ(Quantizer):
    name = "slq"
    kinds = ("weight",)

    @dataclass
    class Config(Quantizer.Config):
        bits: int = 4
        """K = 2^bits centroids per layer, 1..8."""
        schedule: list[float] = field(default_factory=lambda: list(SCHEDULE))
        """The share of the K clusters quantized at each stage: non-decreasing, in [0, 1]."""
        stage_steps: int = 60
        """Optimizer steps per stage, >= 1."""
        start_step: int = 0
        """Stage 0 starts after this optimizer step, >= 0."""
        layer_steps: int = 0
        """MLQ: the ℓ-th layer with this quantizer starts ℓ·layer_steps steps after
        ``start_step`` (0: every layer at once, SLQ), >= 0."""

        def __post_init__(self) -> None:
            b = self.bits
            need(1 <= b <= 8, "bits", f"must be in [1, 8] (K = 2^bits ≤ 256); got {b}")
            s = [float(p) for p in self.schedule]
            need(len(s) > 0 and all(0 <= p <= 1 for p in s), "schedule",
                 f"must be a non-empty list of shares in [0, 1]; got {s}")
            need(all(a <= b for a, b in zip(s, s[1:])), "schedule",
                 f"must be non-decreasing (quantized clusters stay quantized); got {s}")
            need(self.stage_steps >= 1, "stage_steps", f"must be >= 1; got {self.stage_steps}")
            need(self.start_step >= 0, "start_step", f"must be >= 0; got {self.start_step}")
            need(self.layer_steps >= 0, "layer_steps", f"must be >= 0; got {self.layer_steps}")

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        super().__init__(kind, cfg, **args)
        c = self.cfg
        self.bits, self.stage_steps, self.start_step = c.bits, c.stage_steps, c.start_step
        self.layer_steps = c.layer_steps
        self.schedule = [float(p) for p in c.schedule]
        k = 2 ** c.bits
        self.register_buffer("centroids", torch.zeros(k))
        self.register_buffer("used", torch.zeros((), dtype=torch.long))  # clusters quantized
        self.register_buffer("index", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("frozen", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("stage", torch.full((), -1, dtype=torch.long))

    def init_from(self, w: Tensor) -> None:
        reject_bn_folding(self)
        self.index = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        self.frozen = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        self.advance(w)

    def planned(self, stage: int) -> int:
        """m_s = round(σ_s·K): the clusters quantized after stage ``stage``."""
        return int(math.floor(self.schedule[stage] * 2 ** self.bits + 0.5))

    def first_step(self) -> int:
        """The step after which this layer's stage 0 starts: ``start_step`` + ℓ·``layer_steps``
        (ℓ: ``layer_index``, set by ``prepare``; 0 for a quantizer used on its own)."""
        return self.start_step + self.__dict__.get("layer_index", 0) * self.layer_steps

    def current_stage(self) -> int:
        t = int(self.steps) - self.first_step()
        return -1 if t < 0 else min(t // self.stage_steps, len(self.schedule) - 1)

    @torch.no_grad()
    def advance(self, w: Tensor) -> None:
        """Run the stage of the current step count if it is a new one."""
        s = self.current_stage()
        if s > int(self.stage):
            self.stage.fill_(s)
            self.quantize_clusters(w.detach().float(), self.planned(s))

    @torch.no_grad()
    def quantize_clusters(self, w: Tensor, m: int) -> None:
        """Re-cluster the unfrozen weights into K − used clusters and quantize the m − used of
        lowest loss (all of them when m = K)."""
        k, used = 2 ** self.bits, int(self.used)
        if m <= used or bool(self.frozen.all()):
            return
        free = ~self.frozen.reshape(-1).cpu()
        x = w.reshape(-1).cpu()[free]
        c, idx = kmeans_1d(x, init_centroids(x, k - used, "linear"))
        loss = cluster_losses(x, c, idx)
        pick = torch.argsort(loss, stable=True)[:m - used] if m < k \
            else torch.arange(k - used)
        slot = torch.full((k - used,), -1, dtype=torch.long)
        slot[pick] = torch.arange(used, used + pick.numel())
        new = slot[idx]  # the codebook slot of each free weight, −1: stays free
        chosen = torch.zeros_like(free)
        chosen[free.nonzero().reshape(-1)[new >= 0]] = True
        index = self.index.reshape(-1).cpu().clone()
        index[chosen] = new[new >= 0].to(torch.uint8)
        cent = self.centroids.cpu().clone()
        cent[slot[pick]] = c[pick].float()
        dev = self.frozen.device
        self.centroids.copy_(cent.to(dev))
        self.index = index.reshape(w.shape).to(dev)
        self.frozen = (self.frozen.reshape(-1) | chosen.to(dev)).reshape(w.shape)
        self.used.fill_(used + pick.numel())

    def after_step(self, weight: Optional[Tensor]) -> None:
        self.steps += 1
        if weight is not None:
            self.advance(weight)

    def quantize(self, w: Tensor) -> Tensor:
        return torch.where(self.frozen, self.centroids[self.index.long()], w)

    def encode(self, w: Tensor) -> SharedCodebook | Dense:
        n = w.shape[0]
        if bool(self.frozen.all()):
            return SharedCodebook(self.index.reshape(n, -1), self.centroids.float(), self.bits)
        return Dense(self.quantize(w.detach().float()).reshape(n, -1))

"""Optimizer-side compression: 1-bit Adam (Tang et al., ICML 2021, "1-bit Adam: Communication
Efficient Large-Scale Training with Adam's Convergence Speed") over any of dqt's codecs and the
bandwidth-optimal two-phase all-reduce.

Why not compress the gradient under Adam: Adam divides each coordinate's momentum by the root
of its second moment v. A codec's error enters v as well as m; with a few bits per value it is
larger than most coordinates' gradient, so v is inflated and the update direction becomes noise
(measured in ``docs/comm.md``). 1-bit Adam keeps v away from the codec:

1. **Warm-up** (the first ``freeze_steps`` steps): the gradients are averaged by a plain fp32
   all-reduce and Adam(W) runs as usual, estimating v.
2. **Compression**: v is frozen. Each rank folds its *local* gradient into the momentum,
   m_r = β₁·m + (1 − β₁)·g_r, and the ranks average the *preconditioned* momentum
   u_r = m_r / (√v̂ + ε) — the update itself, in Adam's normalised units — through the codec's
   two-phase all-reduce (:func:`dqt.comm.collective.two_phase_allreduce`) with worker and server
   error feedback (for the codecs that take it, ``scheme.error_feedback``). Since v is frozen and
   identical on every rank, the mean of u_r is the mean momentum, preconditioned; compressing
   it instead of m keeps the codec's error in proportion to each coordinate's step, where a
   codec applied to m (DeepSpeed) hands every coordinate of a block the same absolute error and
   Adam then divides it by that coordinate's √v̂ — huge steps for small-variance coordinates
   (and a division by ε where v̂ = 0: sign codecs cannot send 0, DeepSpeed's ``exp_avg_mask``
   problem). Coordinates whose v̂ is 0 at the freeze take their tensor's mean v̂ and u is
   clamped to ±1/√(1 − β₂) (:class:`dqt.optim.FrozenVarianceAdamW`): a frozen v̂ no longer grows
   when a rarely active coordinate's gradient does, so without them one such coordinate could
   take a step of any size (and, through the block's shared scale, move its neighbours too).
   Codecs without error feedback (the unbiased ``ternary_grad``, ``qsgd``) average only the new
   term (1 − β₁)·g_r / (√v̂ + ε) and add β₁·m / (√v̂ + ε), common to every rank
   (:attr:`dqt.optim.FrozenVarianceAdamW.average_gradient_term`): their error, fresh noise
   every step, then enters the momentum scaled by 1 − β₁ instead of at full size. Every rank
   decodes the same bytes, so u, m = u·(√v̂ + ε) and the parameters stay bitwise identical
   across ranks.
3. The update is AdamW's with bias correction: x ← x − lr·wd·x − lr·û with û = u / (1 − β₁ᵗ)
   (during the warm-up, u = m / (√v̂ + ε) from the exact averages).

Compared with DeepSpeed's ``OnebitAdam``: the error-feedback residuals are per-rank state saved
and restored exactly (:meth:`MomentumComm.state_dict`; DeepSpeed resets them on load); any world
size; gradient accumulation and autocast work because the optimizer sees ordinary ``.grad``
tensors; bytes are counted like every scheme's; the codec is any dqt codec (1-bit, ternary,
k-bit), chosen by its config.

The gradients are *not* averaged by DDP: :meth:`MomentumComm.attach` gives DDP a hook that
returns the local gradient, and the optimizer does all the communication (the warm-up all-reduce
too), so the same optimizer also runs in a loop without DDP.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dqt.comm.collective import BucketContext, run_sync, two_phase_allreduce
from dqt.comm.config import CompressedConfig, OneBitConfig
from dqt.comm.layout import BucketLayout, ParamSlot, build_layout
from dqt.comm.scheme import Scheme
from dqt.optim import FrozenVarianceAdamW


class MomentumComm(Scheme):
    """The communication of :class:`OneBitAdam`: its process group, byte meter, the
    flat-buffer layout of the momentum, and the per-rank error-feedback residuals (saved per
    rank through :meth:`state_dict`). Attached to a DDP model it turns DDP's gradient
    all-reduce off (the optimizer communicates)."""

    def __init__(self, codec: CompressedConfig, process_group: dist.ProcessGroup | None = None
                 ) -> None:
        if not isinstance(codec, CompressedConfig):
            raise TypeError(f"the momentum codec must be a dqt codec config (OneBitConfig(), "
                            f"TernaryGradConfig(), QSGDConfig(), ...); got {codec!r}")
        if codec.vote:
            raise ValueError(f"scheme.name: {codec.name} averages by majority vote, which keeps "
                             "only the sign of the momentum; use onebit or ef_signsgd")
        super().__init__(process_group)
        self.codec = codec
        self.name = f"onebit_adam/{codec.name}"
        self.spec = codec.block_spec()
        self.rank = dist.get_rank(self.process_group)
        self.error_feedback = bool(codec.error_feedback)
        self.numel = 0
        self.layout: Optional[BucketLayout] = None
        self.worker: Optional[Tensor] = None
        self.server: Optional[Tensor] = None

    # ------------------------------------------------------------------ set-up
    def attach(self, model: Any) -> None:
        """A DDP model: register a hook that leaves every rank's gradient local."""
        register = getattr(model, "register_comm_hook", None)
        if register is None:
            raise TypeError(f"optim=onebit_adam communicates through torch.distributed; it "
                            f"attaches to a DistributedDataParallel model, not {type(model).__name__}")
        register(None, _local_gradient_hook)

    def setup(self, numel: int, device: torch.device) -> None:
        """Lay out a flat buffer of ``numel`` values (the optimizer's momentum, parameter
        order, one slot per parameter given by :meth:`OneBitAdam`)."""
        self.numel = numel
        if self.error_feedback:
            self.worker = torch.zeros(numel, dtype=torch.float32, device=device)
            self.server = torch.zeros(numel, dtype=torch.float32, device=device)

    def build_layout(self, sizes: list[int], device: torch.device) -> None:
        slots, off = [], 0
        for n in sizes:  # blocks never cross a parameter tensor
            slots.append(ParamSlot(off, off, n))
            off += n
        self.layout = build_layout(slots, self.world_size, self.rank, self.spec,
                                   flag=self.codec.vote, device=device)

    # ------------------------------------------------------------------ the collectives
    def mean(self, flat: Tensor) -> Tensor:
        """Plain fp32 mean all-reduce of ``flat`` in place (the warm-up's gradients)."""
        self.meter.record_raw(flat.numel(), self.world_size)
        if self.world_size == 1:
            return flat
        t0 = time.perf_counter()
        flat.div_(self.world_size)
        self.meter.record("all_reduce", flat, self.world_size)
        dist.all_reduce(flat, group=self.process_group)
        self.meter.add_time("communicate", time.perf_counter() - t0)
        return flat

    def compressed_mean(self, flat: Tensor, step: int) -> Tensor:
        """The codec's two-phase average of ``flat`` over the ranks, in place, with worker and
        server error feedback; identical bytes, hence identical values, on every rank."""
        self.meter.record_raw(flat.numel(), self.world_size)
        if self.world_size == 1:
            return flat
        t0 = time.perf_counter()
        ctx = BucketContext(self.rank, self.world_size, self.codec.seed, step, 0, self.meter,
                            self.codec.kernel)
        work = two_phase_allreduce(self.spec, flat, self.layout, ctx, self.worker, self.server,
                                   1.0, self.codec.vote, out=flat)
        out = run_sync(work, self.process_group, self.meter)
        self.meter.hook_s += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ per-rank state
    def state_dict(self) -> dict[str, Any]:
        return {"worker_residual": None if self.worker is None else self.worker.clone(),
                "server_residual": None if self.server is None else self.server.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, buf in (("worker_residual", self.worker), ("server_residual", self.server)):
            saved = state.get(key)
            if buf is None or saved is None:
                continue
            if saved.shape != buf.shape:
                raise ValueError(f"{key}: the checkpoint has {saved.numel()} values, the "
                                 f"optimizer {buf.numel()}")
            buf.copy_(saved)


def _local_gradient_hook(state, bucket):  # unannotated: DDP checks annotations by identity
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class OneBitAdam(FrozenVarianceAdamW):
    """Adam(W) with a frozen variance and a compressed all-reduce of the preconditioned
    momentum (1-bit Adam; see the module docstring).

    Args:
        params: parameters or param groups (each group may set ``lr``, ``weight_decay``, ``eps``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        freeze_steps: steps of uncompressed Adam before v is frozen and compression starts.
        codec: the momentum's codec, a dqt codec config (default ``OneBitConfig()``).
        comm: a :class:`MomentumComm` to use (the trainer passes the one it attached to DDP);
            by default one is made from ``codec`` and ``process_group``.

    Call it after ``torch.distributed.init_process_group``. The ranks' models must start
    identical (same seed, or a broadcast). Per-rank state (the residuals) is
    ``self.comm.state_dict()``; the rest, identical on every rank, is ``self.state_dict()``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, freeze_steps: int = 100,
                 codec: Optional[CompressedConfig] = None, comm: Optional[MomentumComm] = None,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, freeze_steps=freeze_steps)
        self.comm = comm if comm is not None else MomentumComm(codec or OneBitConfig(),
                                                               process_group)
        # a codec without error feedback (the unbiased ternary_grad, qsgd) would leave its
        # error in the momentum, step after step: it averages the momentum's new term instead
        self.average_gradient_term = not self.comm.error_feedback
        self.comm.setup(self.exp_avg.numel(), self.exp_avg.device)
        self.comm.build_layout(self._sizes, self.exp_avg.device)

    def warm_up_gradient(self, g: Tensor) -> Tensor:
        """Warm-up: the local gradients, averaged by a plain fp32 all-reduce."""
        return self.comm.mean(g)

    def average_update(self, u: Tensor) -> Tensor:
        """After the freeze: the ranks' preconditioned momenta (or only their new terms:
        ``average_gradient_term``), averaged compressed."""
        return self.comm.compressed_mean(u, self.step_count)

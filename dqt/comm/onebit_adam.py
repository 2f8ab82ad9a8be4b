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
   problem). Coordinates whose v̂ is 0 at the freeze (gradients that were always zero) are
   not updated, and u is clamped to the bound Adam's own step obeys, |m̂/√v̂| ≤
   max(1, (1 − β₁)/√(1 − β₂)) (Kingma & Ba 2015, §2.1): a frozen v̂ no longer grows when a
   rarely active coordinate's gradient does, so without it one such coordinate could take a
   step of any size (and, through the block's shared scale, move its neighbours too). Every rank decodes the same bytes, so u, m = u·(√v̂ + ε) and the parameters
   stay bitwise identical across ranks.
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

import math
import time
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dqt.comm.collective import BucketContext, run_sync, two_phase_allreduce
from dqt.comm.config import CompressedConfig, OneBitConfig
from dqt.comm.layout import BucketLayout, ParamSlot, build_layout
from dqt.comm.scheme import Scheme


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


class OneBitAdam(torch.optim.Optimizer):
    """Adam(W) with a frozen variance and a compressed momentum all-reduce (1-bit Adam).

    Args:
        params: parameters or param groups (each group may set ``lr`` and ``weight_decay``).
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
        if not lr > 0:
            raise ValueError(f"optim.lr: must be > 0; got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"optim.betas: must be in [0, 1); got {betas}")
        if freeze_steps < 1:
            raise ValueError(f"optim.freeze_steps: must be >= 1 (v is estimated from "
                             f"uncompressed steps first); got {freeze_steps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.freeze_steps = int(freeze_steps)
        self.comm = comm if comm is not None else MomentumComm(codec or OneBitConfig(),
                                                               process_group)
        self._params = [p for g in self.param_groups for p in g["params"]]
        sizes = [p.numel() for p in self._params]
        device = self._params[0].device if self._params else torch.device("cpu")
        n = sum(sizes)
        self.step_count = 0
        self.exp_avg = torch.zeros(n, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(n, dtype=torch.float32, device=device)
        self._denom: Optional[Tensor] = None  # √v̂ + ε, fixed once v is frozen
        self.comm.setup(n, device)
        self.comm.build_layout(sizes, device)
        self._offsets = [0]
        for s in sizes:
            self._offsets.append(self._offsets[-1] + s)

    @property
    def frozen(self) -> bool:
        """True once v is frozen (the next steps communicate the compressed momentum)."""
        return self.step_count >= self.freeze_steps

    def _flat_grad(self) -> Tensor:
        g = torch.empty_like(self.exp_avg)
        for p, a, b in zip(self._params, self._offsets[:-1], self._offsets[1:]):
            if p.grad is None:
                g[a:b].zero_()
            else:
                g[a:b].copy_(p.grad.reshape(-1))
        return g

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        beta1, beta2 = self.param_groups[0]["betas"]
        g = self._flat_grad()
        m, v = self.exp_avg, self.exp_avg_sq
        if not self.frozen:  # warm-up: averaged gradients, v estimated
            self.comm.mean(g)
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc2 = 1 - beta2 ** (self.step_count + 1)
            u = m / self._denominator(bc2)
        else:  # local momentum; the preconditioned momentum averaged compressed; v frozen
            denom = self._frozen_denominator()
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            u = m / denom
            bound = max(1.0, (1 - beta1) / math.sqrt(1 - beta2)) * (1 - beta1 ** (self.step_count + 1))
            u.clamp_(-bound, bound)  # Adam's own bound on |m̂/√v̂| (Kingma & Ba, §2.1)
            self.comm.compressed_mean(u, self.step_count)
            u.mul_(self._live)  # v̂ = 0: never updated
            torch.mul(u, denom, out=m)  # the common momentum, for the next step
        self.step_count += 1
        bc1 = 1 - beta1 ** self.step_count
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                i = self._index[id(p)]
                a, b = self._offsets[i], self._offsets[i + 1]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u[a:b].view_as(p), alpha=-lr / bc1)
        return loss

    def _denominator(self, bc2: float) -> Tensor:
        """√(v / bc2) + ε per coordinate (ε of each coordinate's param group)."""
        denom = (self.exp_avg_sq / bc2).sqrt_()
        for group in self.param_groups:
            a = self._offsets[self._index[id(group["params"][0])]] if group["params"] else 0
            n = sum(p.numel() for p in group["params"])
            denom[a:a + n].add_(group["eps"])
        return denom

    def _frozen_denominator(self) -> Tensor:
        if self._denom is None:
            self._denom = self._denominator(1 - self.param_groups[0]["betas"][1] ** self.freeze_steps)
            self._live = (self.exp_avg_sq > 0).to(torch.float32)
        return self._denom

    @property
    def _index(self) -> dict[int, int]:
        idx = self.__dict__.get("_index_cache")
        if idx is None:
            idx = {id(p): i for i, p in enumerate(self._params)}
            self.__dict__["_index_cache"] = idx
        return idx

    # ------------------------------------------------------------------ state (identical on all ranks)
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
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)

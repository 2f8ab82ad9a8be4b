"""dqt's codecs in FSDP2's gradient reduce-scatter (``torch.distributed.fsdp.fully_shard``).

FSDP2 reduces each ``fully_shard`` module's gradients with one reduce-scatter of a flat buffer
laid out as N equal chunks — chunk r is rank r's shard, the concatenation of every parameter's
dim-0 shard, zero-padded to equal length. :class:`FSDPCompression` gives every FSDP module a
custom reduce-scatter (``FSDPModule.set_custom_reduce_scatter``, torch ≥ 2.9):

* a compressed scheme (``onebit``, ``ef_signsgd``, ``signsgd``, ``ternary_grad``, ``qsgd``): phase 1
  of dqt's two-phase all-reduce (:func:`dqt.comm.collective.compressed_reduce_scatter`) —
  encode the whole unsharded gradient with the worker's error feedback into N messages (one
  fused kernel pass), ``all_to_all``, decode the N messages of the owned chunk and average them
  in rank order (fp32) or take their majority vote. Blocks never cross a parameter and never
  cover FSDP's padding (:func:`dqt.comm.layout.shard_layout`). There is no phase 2: the owned
  average *is* the sharded gradient, so there is no server residual, and each rank sends
  (N − 1)/N of one compressed copy of the buffer;
* ``bf16`` / ``fp16``: the buffer ÷ N cast to 16 bits, reduce-scatter (sum), cast back — what
  PyTorch's 16-bit DDP hooks do, here for FSDP;
* no scheme: FSDP's own reduce-scatter, counted.

As under DDP, a compressed scheme's warm-up steps (``scheme.warmup_steps``) and modules of fewer
than ``scheme.min_bucket_numel`` gradient values go through the plain fp32 reduce-scatter.

**Error feedback** of a compressed scheme lives per rank over the whole unsharded gradient of
the module, in the reduce-scatter's own layout (one flat buffer per module, read and written in
the encoding pass). :meth:`FSDPCompression.state_dict` gives it per parameter in parameter order
(this rank's, unsharded: save one file per rank, as for DDP);
:meth:`FSDPCompression.sharded_state_dict` gives the same tensors as DTensors of shape
(N, numel) sharded over the ranks, for ``torch.distributed.checkpoint``. A resume on the same
number of ranks restores every rank's residual exactly. On another number of ranks
(:meth:`FSDPCompression.load_resharded`) every new rank starts from the mean of the saved
residuals, which keeps the mean residual — the part of the average gradient not yet applied —
exactly: Σ applied + mean(e) is what error feedback conserves.

Every rank issues the same collectives in the same order: FSDP reduces modules in the same order
on every rank, and each module's comm counts its own calls (the Philox step of its keys).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dqt.comm.collective import BucketContext, compressed_reduce_scatter, run_sync
from dqt.comm.compressors import Compressor
from dqt.comm.config import BF16Config, CompressedConfig, FP16Config
from dqt.comm.layout import BucketLayout, shard_layout
from dqt.comm.scheme import Scheme

log = logging.getLogger("dqt")

try:  # torch >= 2.9
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
except ImportError:  # pragma: no cover - older torch
    FSDPModule = AllGather = ReduceScatter = None  # type: ignore[assignment,misc]

# torch 2.13 renamed reduce_scatter_tensor (now deprecated) to reduce_scatter_single, and
# all_gather_into_tensor to all_gather_single
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
GATHERS = ("fp32", "bf16")
_HALF = {BF16Config: torch.bfloat16, FP16Config: torch.float16}


def fsdp_supported(cfg: Any) -> bool:
    """Can :class:`FSDPCompression` run the scheme config ``cfg`` (None: plain)?"""
    return cfg is None or type(cfg) in _HALF or isinstance(cfg, CompressedConfig)


class _ModuleComm(ReduceScatter if ReduceScatter is not None else object):  # type: ignore[misc]
    """The reduce-scatter of one FSDP module's parameter group."""

    def __init__(self, owner: "FSDPCompression", index: int, params: list[Any],
                 names: list[str]) -> None:
        self.owner, self.index, self.names = owner, index, names
        self.params = params  # FSDPParam objects, in the order of the reduce-scatter buffer
        self.step = 0
        self.residual: torch.Tensor | None = None  # the reduce-scatter's layout, N·S values
        self._layout: BucketLayout | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # loaded before the first step

    def allocate(self, size, *, dtype, device):  # noqa: D102 - FSDP's Comm interface
        return torch.empty(*size, dtype=dtype, device=device)

    # ------------------------------------------------------------------ geometry
    def _shards(self, world: int) -> list[tuple[int, list[int]]]:
        """(padded shard length, real values per rank) of each parameter."""
        out = []
        for fp in self.params:
            shape = tuple(fp._orig_size)
            padded = tuple(fp.padded_sharded_param_size)
            L = _numel(padded)
            if fp.fsdp_placement.dim == 0:
                rows, row = padded[0], _numel(shape[1:])
                real = [max(0, min(rows, shape[0] - r * rows)) * row for r in range(world)]
            else:  # Shard(d > 0) must be even: no padding
                real = [L] * world
            out.append((L, real))
        return out

    def _param_views(self, flat: torch.Tensor, world: int) -> list[torch.Tensor]:
        """Each parameter's values (parameter order, unpadded) gathered from a buffer in the
        reduce-scatter's layout — for dim-0 shards, chunk r's rows in rank order."""
        chunks = flat.view(world, -1)
        out, off = [], 0
        for fp, (L, real) in zip(self.params, self._shards(world)):
            numel = _numel(tuple(fp._orig_size))
            if fp.fsdp_placement.dim == 0:
                out.append(chunks[:, off:off + L].reshape(-1)[:numel])
            else:  # FSDP cats the dim-d chunks along dim 0: undo it
                d = fp.fsdp_placement.dim
                part = chunks[:, off:off + L].reshape(world, *tuple(fp.padded_sharded_param_size))
                out.append(torch.cat(list(part), dim=d).reshape(-1))
            off += L
        return out

    def _write_params(self, flat: torch.Tensor, world: int, values: dict[str, torch.Tensor]
                      ) -> None:
        """Inverse of :meth:`_param_views`: parameter-order values into the layout."""
        chunks = flat.view(world, -1)
        off = 0
        for fp, name, (L, real) in zip(self.params, self.names, self._shards(world)):
            v = values[name].reshape(-1).to(flat.dtype)
            if fp.fsdp_placement.dim == 0:
                padded = torch.zeros(world * L, dtype=flat.dtype, device=flat.device)
                padded[:v.numel()] = v
                chunks[:, off:off + L] = padded.view(world, L)
            else:
                d = fp.fsdp_placement.dim
                full = v.view(tuple(fp._orig_size))
                parts = torch.chunk(full, world, dim=d)
                chunks[:, off:off + L] = torch.stack([p.reshape(-1) for p in parts])
            off += L

    # ------------------------------------------------------------------ the collective
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: Any, async_op: bool = False) -> None:
        owner, world = self.owner, group.size()
        start = time.perf_counter()
        meter = owner.meter
        meter.bytes_raw += _reduce_scatter_bytes(input_tensor.numel() * 4, world)
        mean = op == dist.ReduceOp.AVG
        if not mean and op != dist.ReduceOp.SUM:
            raise ValueError(f"dqt FSDP reduce-scatter: reduce op {op} is not supported (FSDP "
                             "passes AVG, or SUM with its own division)")
        cfg = owner.cfg
        if isinstance(cfg, CompressedConfig) and self.step >= cfg.warmup_steps and \
                input_tensor.numel() >= cfg.min_bucket_numel:  # as the DDP hook's buckets
            self._compressed(output_tensor, input_tensor, group, world, mean)
        elif type(cfg) in _HALF:
            half = input_tensor.div(world).to(_HALF[type(cfg)])
            out = torch.empty(output_tensor.numel(), dtype=half.dtype, device=half.device)
            meter.bytes_sent += _reduce_scatter_bytes(half.numel() * half.element_size(), world)
            _reduce_scatter(out, half, group=group)
            output_tensor.copy_(out)
            if not mean:
                output_tensor.mul_(world)
        else:
            meter.bytes_sent += _reduce_scatter_bytes(input_tensor.numel() *
                                                      input_tensor.element_size(), world)
            _reduce_scatter(output_tensor, input_tensor, op=op, group=group)
        self.step += 1
        meter.hook_s += time.perf_counter() - start

    def _compressed(self, out: torch.Tensor, x: torch.Tensor, group: dist.ProcessGroup,
                    world: int, mean: bool) -> None:
        owner = self.owner
        rank = dist.get_rank(group)
        if self._layout is None or self._layout.n != x.numel():
            self._layout = shard_layout(self._shards(world), world, rank, owner.spec,
                                        flag=owner.vote, device=x.device)
            if owner.error_feedback:
                self.residual = torch.zeros(x.numel(), dtype=torch.float32, device=x.device)
                if self._pending is not None:
                    self._write_params(self.residual, world, self._pending)
                    self._pending = None
        layout = self._layout
        src = x if x.dtype == torch.float32 else x.float()
        dst = out if out.dtype == torch.float32 else torch.empty(out.numel(), device=out.device)
        if layout.own_len != dst.numel():
            raise RuntimeError(f"dqt FSDP reduce-scatter: output of {dst.numel()} values for a "
                               f"shard of {layout.own_len}")
        dst.zero_()  # FSDP's padding: no block decodes there
        ctx = BucketContext(rank, world, owner.cfg.seed, self.step, self.index, owner.meter,
                            owner.cfg.kernel)
        work = compressed_reduce_scatter(owner.spec, src, layout, ctx, self.residual,
                                         owner.grad_scale, owner.vote, out=dst)
        run_sync(work, group, owner.meter)
        if not mean and not owner.vote:
            dst.mul_(world)
        if dst is not out:
            out.copy_(dst)

    # ------------------------------------------------------------------ state
    def residuals(self, world: int) -> dict[str, torch.Tensor]:
        """This rank's residual of each parameter (parameter order, unpadded), zeros before
        the first compressed step."""
        if self.residual is None:
            if self._pending is not None:
                return {k: v.clone() for k, v in self._pending.items()}
            return {n: torch.zeros(_numel(tuple(fp._orig_size)))
                    for n, fp in zip(self.names, self.params)}
        return {n: v.clone() for n, v in zip(self.names, self._param_views(self.residual, world))}

    def load_residuals(self, values: dict[str, torch.Tensor], world: int) -> None:
        if self.residual is None:
            self._pending = {n: values[n].clone() for n in self.names}
        else:
            self._write_params(self.residual, world, values)


class _HalfAllGather(AllGather if AllGather is not None else object):  # type: ignore[misc]
    """FSDP's parameter all-gather in bf16 (ZeRO++'s quantized weights, at 16 bits): each rank
    sends its fp32 shard rounded to bf16 (nearest even) and every rank, its own shard included,
    gets the same bf16-valued parameters — half the bytes. The sharded fp32 parameters the
    optimizer updates stay exact; forward and backward compute with their rounded copies.
    Parameter groups FSDP gathers in another dtype pass through unchanged."""

    def __init__(self, meter: Any) -> None:
        self.meter = meter

    def allocate(self, size, *, dtype, device):  # noqa: D102 - FSDP's Comm interface
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> None:
        world = group.size()
        if output_tensor.dtype != torch.float32:
            _all_gather(output_tensor, input_tensor, group=group)
            return
        half = input_tensor.to(torch.bfloat16)  # (a view into output_tensor: read it first)
        gathered = torch.empty(world * half.numel(), dtype=torch.bfloat16, device=half.device)
        self.meter.add_gather((world - 1) * half.numel() * 2, (world - 1) * half.numel() * 4)
        _all_gather(gathered, half, group=group)
        output_tensor.copy_(gathered)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _reduce_scatter_bytes(nbytes: int, world: int) -> int:
    """What one rank sends in a ring reduce-scatter of ``nbytes``: (N − 1)/N of it."""
    return (world - 1) * nbytes // world if world > 1 else 0


class FSDPCompression(Scheme):
    """A gradient-communication scheme for an FSDP2 model (what :func:`dqt.comm.compress`
    returns for a ``fully_shard`` model): :meth:`stats`, :meth:`set_grad_scale`,
    :meth:`state_dict` / :meth:`load_state_dict` (this rank's error feedback; one file per
    rank) and :meth:`sharded_state_dict` / :meth:`load_sharded_state_dict` /
    :meth:`load_resharded` (the same through ``torch.distributed.checkpoint``)."""

    def __init__(self, cfg: Any, gather: str = "fp32") -> None:
        if gather not in GATHERS:
            raise ValueError(f"gather (backend.fsdp_gather): must be one of "
                             f"{', '.join(GATHERS)}; got {gather!r}")
        self.gather = gather
        if not fsdp_supported(cfg):
            name = getattr(cfg, "name", type(cfg).__name__)
            raise ValueError(f"scheme.name: '{name}' cannot run in FSDP's reduce-scatter (it "
                             "needs the whole gradient on every rank); FSDP takes onebit, "
                             "ef_signsgd, signsgd, ternary_grad, qsgd, bf16, fp16 or no scheme")
        self.process_group = dist.group.WORLD  # the collectives run on FSDP's own group
        from dqt.comm.meter import CommMeter

        self.meter = CommMeter()
        self.cfg = cfg
        self.name = "allreduce" if cfg is None else cfg.name
        compressed = isinstance(cfg, CompressedConfig)
        self.spec = Compressor(cfg).spec if compressed else None
        self.vote = Compressor(cfg).vote if compressed else False
        self.error_feedback = compressed and bool(cfg.error_feedback)
        self.grad_scale = 1.0
        self.comms: list[_ModuleComm] = []

    def set_grad_scale(self, scale: float) -> None:
        self.grad_scale = float(scale)

    def set_preconditioner(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("optim.freeze_variance: the frozen-variance preconditioner is not "
                         "supported under FSDP")

    def attach(self, model: nn.Module) -> None:
        """Give every ``fully_shard`` module of ``model`` (the root included) its reduce-scatter."""
        if FSDPModule is None:
            raise RuntimeError("dqt's FSDP path needs torch >= 2.9 (set_custom_reduce_scatter)")
        names = {id(p): n for n, p in model.named_parameters()}
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = module._get_fsdp_state()
            for group in state._fsdp_param_groups:
                params = list(group.fsdp_params)
                comm = _ModuleComm(self, len(self.comms), params,
                                   [names[id(fp.sharded_param)] for fp in params])
                self.comms.append(comm)
                module.set_custom_reduce_scatter(comm)
                if self.gather == "bf16":
                    module.set_custom_all_gather(_HalfAllGather(self.meter))
        if not self.comms:
            raise TypeError("dqt.comm.compress: the model has no fully_shard module")

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: each module's step and, with error feedback, each parameter's
        residual (unsharded, parameter order)."""
        world = self.world_size
        return {"steps": [c.step for c in self.comms],
                "residual": {k: v for c in self.comms for k, v in c.residuals(world).items()}
                if self.error_feedback else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps = state["steps"]
        if len(steps) != len(self.comms):
            raise ValueError(f"scheme state of {len(steps)} FSDP modules for a model of "
                             f"{len(self.comms)}")
        for c, s in zip(self.comms, steps):
            c.step = int(s)
        if self.error_feedback and state.get("residual") is not None:
            for c in self.comms:
                c.load_residuals(state["residual"], self.world_size)

    def sharded_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` for ``torch.distributed.checkpoint``: each residual a DTensor of
        shape (N, numel) whose row r is rank r's, and the steps (equal on every rank)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        state = self.state_dict()
        out: dict[str, Any] = {"steps": torch.tensor(state["steps"], dtype=torch.int64)}
        if state["residual"] is not None:
            dev = "cuda" if any(v.is_cuda for v in state["residual"].values()) else "cpu"
            mesh = init_device_mesh(dev, (self.world_size,))
            out["residual"] = {k: DTensor.from_local(v.reshape(1, -1), mesh, [Shard(0)],
                                                     run_check=False)
                               for k, v in state["residual"].items()}
        return out

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`sharded_state_dict` returned (after ``dcp.load`` into it)."""
        res = state.get("residual")
        self.load_state_dict({"steps": state["steps"].tolist(),
                              "residual": None if res is None else
                              {k: v.to_local().reshape(-1) for k, v in res.items()}})

    def resharded_template(self, saved_world: int) -> dict[str, Any]:
        """What to ``dcp.load`` a state saved by ``saved_world`` ranks into, when that differs
        from this run's: plain (replicated) tensors of the saved shapes."""
        out: dict[str, Any] = {"steps": torch.zeros(len(self.comms), dtype=torch.int64)}
        if self.error_feedback:
            out["residual"] = {n: torch.zeros(saved_world, _numel(tuple(fp._orig_size)))
                               for c in self.comms for n, fp in zip(c.names, c.params)}
        return out

    def load_resharded(self, state: dict[str, Any], mean: bool = True) -> None:
        """A state saved by another number of ranks (:meth:`resharded_template`, loaded): every
        rank's residual ← the mean of the saved ranks' (which keeps the mean residual), or
        zero with ``mean=False``; the steps are kept either way."""
        res = state.get("residual")
        self.load_state_dict({"steps": state["steps"].tolist(),
                              "residual": None if res is None or not mean else
                              {k: v.mean(0) for k, v in res.items()}})

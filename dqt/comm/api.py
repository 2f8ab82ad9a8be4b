"""The public entry point of the wire side: ``compress(ddp_model, config)``.

    import dqt.comm as comm
    handle = comm.compress(ddp_model, comm.TernaryGrad())   # or comm.compress(ddp_model, "ternary_grad")
    ...                                                      # train as usual: loss.backward() communicates compressed
    torch.save(handle.state_dict(), f"comm_rank{rank}.pt")   # per-rank state (error feedback, ...)
    handle.load_state_dict(torch.load(f"comm_rank{rank}.pt"))
    handle.stats()                                           # bytes sent/raw, ratio, times since the last call

The config classes are the scheme's key (as ``torchao.quantize_``'s): each one's defaults are
its shipped preset (``conf/scheme/NAME.yaml`` adds nothing to them), so ``preset(name)`` is the
class built with no arguments. Misuse fails before anything is attached, with one message
naming the problem.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dqt.comm.config import SCHEME_CONFIGS, SchemeConfig
from dqt.comm.fsdp import FSDPCompression, FSDPModule, fsdp_supported
from dqt.comm.scheme import SCHEMES, Scheme, build_scheme

_ATTACHED = "_dqt_scheme"  # the attribute that marks a DDP model as compressed


def presets() -> list[str]:
    """The names of the shipped scheme presets (``+scheme=NAME`` on the command line)."""
    return sorted(SCHEME_CONFIGS)


def preset(name: str) -> SchemeConfig:
    """The config of the shipped preset ``name`` (``"onebit"``, ``"ternary_grad"``, ...): the
    same values ``+scheme=NAME`` gives the trainer."""
    cls = SCHEME_CONFIGS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown scheme preset {name!r}; the presets are: "
                         f"{', '.join(presets())}")
    return cls()


def compress(model: Any, config: SchemeConfig | str | None, *,
             process_group: dist.ProcessGroup | None = None, gather: str = "fp32") -> Scheme:
    """Compress the gradient all-reduce of a ``DistributedDataParallel`` model, or the gradient
    reduce-scatter of an FSDP2 (``fully_shard``) model.

    Args:
        model: the DDP-wrapped model, or the root of a ``fully_shard`` model (every
            ``fully_shard`` module in it gets the compressed reduce-scatter:
            :mod:`dqt.comm.fsdp`), before its first backward.
        config: a scheme config (``OneBit()``, ``TernaryGrad(format="base3")``, ``QSGD(bits=4)``,
            ``EFSignSGD()``, ``SignSGD()``, ``PowerSGD()``, ``BF16()``, ``FP16()``) or a preset
            name (:func:`presets`). Under FSDP also None (FSDP's own reduce-scatter, counted);
            PowerSGD cannot run there.
        process_group: the ranks to average over; by default a new group of all ranks (the
            scheme's traffic stays separate from the model's own collectives).
        gather: FSDP only: ``"bf16"`` all-gathers the parameters for forward and backward in
            bf16 (half the bytes; the sharded fp32 parameters stay exact), ``"fp32"`` as FSDP.

    Returns:
        The scheme, registered as ``model``'s communication hook: ``state_dict()`` /
        ``load_state_dict()`` carry its per-rank state (error-feedback residuals, PowerSGD
        factors, the step that ends the warm-up; save one file per rank),
        ``stats()`` the bytes and times since its last call, ``set_grad_scale(s)`` the loss
        scale of the coming backward when a ``GradScaler`` scales the loss.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised, or ``model`` already has a dqt
            scheme.
        TypeError: ``model`` is neither a ``DistributedDataParallel`` nor a ``fully_shard``
            model, ``config`` is not a scheme config or a preset name, or the scheme cannot run
            in FSDP's reduce-scatter (PowerSGD).
        ValueError: an unknown preset name.

    Under Adam(W), use :class:`dqt.optim.FrozenVarianceAdamW` with the codecs (and
    ``scheme.set_preconditioner(opt.preconditioner, opt.step_bound)``), as the trainer does:
    plain AdamW lets the codec's noise into its variance (``docs/comm.md``).
    """
    if isinstance(config, str):
        config = preset(config)
    fsdp = FSDPModule is not None and isinstance(model, FSDPModule)
    if not (config is None and fsdp) and (
            not isinstance(config, SchemeConfig) or type(config) not in SCHEMES):
        raise TypeError(f"dqt.comm.compress: config must be a scheme config "
                        f"({', '.join(c.__name__ for c in SCHEME_CONFIGS.values())}) or a preset "
                        f"name ({', '.join(presets())}); got {config!r}")
    if not isinstance(model, DistributedDataParallel) and not fsdp:
        raise TypeError(f"dqt.comm.compress: model must be wrapped in "
                        f"torch.nn.parallel.DistributedDataParallel (the scheme is its "
                        f"communication hook) or be the root of a fully_shard (FSDP2) model; "
                        f"got {type(model).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("dqt.comm.compress: call torch.distributed.init_process_group first "
                           "(the scheme makes a process group of its own)")
    if getattr(model, _ATTACHED, None) is not None:
        raise RuntimeError(f"dqt.comm.compress: this model already has a dqt scheme "
                           f"({getattr(model, _ATTACHED).name}); DDP takes one communication "
                           "hook, so wrap the module in a new DistributedDataParallel")
    if gather != "fp32" and not fsdp:
        raise TypeError("dqt.comm.compress: gather applies to fully_shard (FSDP2) models only")
    if fsdp:
        if not fsdp_supported(config):
            raise TypeError(f"dqt.comm.compress: {config.name} cannot run in FSDP's "
                            "reduce-scatter (it needs the whole gradient on every rank); use "
                            "onebit, ef_signsgd, signsgd, ternary_grad, qsgd, bf16 or fp16")
        scheme: Scheme = FSDPCompression(config, gather)
        scheme.attach(model)
        setattr(model, _ATTACHED, scheme)
        return scheme
    scheme = build_scheme(config, process_group)
    scheme.attach(model)
    setattr(model, _ATTACHED, scheme)
    return scheme


def attached(model: Any) -> Scheme | None:
    """The dqt scheme :func:`compress` attached to ``model``, or None."""
    return getattr(model, _ATTACHED, None)

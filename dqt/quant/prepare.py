"""Attach quantizers to a model in place — no tracing, so any model whose layers are (subclasses
of) ``nn.Linear`` / ``nn.Conv{1,2,3}d`` / ``nn.Embedding`` / ``nn.MultiheadAttention`` works:

* weight: ``torch.nn.utils.parametrize.register_parametrization(layer, "weight", quantizer)``
  (with BN folding, ``FoldScale`` first, then the quantizer); on an attention, one on each of
  its q/k/v projection tensors (``dqt.quant.attention``);
* input activation: a forward pre-hook through ``layer.input_quantizer`` (not on Embedding,
  whose input is integer ids; on an attention, of query, key and value);
* gradient: a forward hook wrapping the output in ``layer.grad_quantizer`` (identity forward,
  quantized backward; an attention's ``out_proj``: on the attention's output).

Slots whose quantizer would never run are refused or left out by ``dqt.quant.rules``.

Quantizers are submodules of their layer, so their parameters (LSQ s, PACT α, TTQ W_p/W_n) and
buffers (EMA ranges, Autoflex state) are in ``state_dict`` and in checkpoints. ``qat_penalty``
runs before every optimizer step (penalty gradients such as ADMM's). ``qat_step``
runs after every optimizer step: it all-reduces (MAX, or SUM where a quantizer's ``reduce`` says
so) the statistics recorded by stateful quantizers, one collective per reduction, and commits
them, so their state is identical on every rank, and applies per-step weight constraints
(BNN / BinaryConnect clipping).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from dqt.errors import ConfigError
from dqt.quant.attention import (out_projections, quantize_attention_inputs,
                                 quantize_out_proj_grad, weight_names)
from dqt.quant.base import ArgError, Quantizer
from dqt.quant.bn_fold import FoldScale, find_layer_bn, unfold_output
from dqt.quant.config import method_config
from dqt.quant.rules import SLOTS, LayerPlan, resolve

log = logging.getLogger("dqt")


def build_quantizer(spec: Any, kind: str) -> Quantizer:
    """The quantizer of one slot's spec (a ``QuantizerConfig``), built from its own ``Config``."""
    cls, cfg = method_config(spec, kind, f"qat.{kind}")
    return cls(kind, cfg)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def _quantize_output_grad(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return module.grad_quantizer(out)


def _scale_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    k = module.input_quantizer.output_scale()
    if k is None:
        return out
    if module.bias is None:
        return out * k.to(out.dtype)
    b = module.bias.reshape(-1, *([1] * (out.dim() - 2))) if out.dim() > 2 and isinstance(
        module, nn.modules.conv._ConvNd) else module.bias
    return (out - b) * k.to(out.dtype) + b


def replace_relu(model: nn.Module, to: str) -> list[str]:
    """Swap every ``nn.ReLU`` module for ``nn.Hardtanh()`` or ``nn.Identity()``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Hardtanh() if to == "hardtanh" else nn.Identity())
    return names


def check_weights(plan: list[LayerPlan]) -> None:
    """Every planned weight quantizer's ``Config.check_weight`` on the weights it will get,
    before anything is attached; an error names the slot's key and the weight."""
    for lp in plan:
        spec = lp.specs["weight"]
        if spec is None:
            continue
        key = f"qat.{lp.source.split(' ')[0]}.weight"
        _, qcfg = method_config(spec, "weight", key)
        for wname in weight_names(lp.module):
            try:
                qcfg.check_weight(tuple(getattr(lp.module, wname).shape))
            except ArgError as e:
                raise ConfigError(f"{key}.{e.field}" if e.field else key,
                                  f"{spec.name} on {lp.name}.{wname}: {e.msg}") from None


def prepare(model: nn.Module, cfg: Any) -> nn.Module:
    """Attach the quantizers that ``cfg`` (a ``QATConfig``) assigns; log the plan."""
    plan = resolve(cfg, model)
    check_weights(plan)
    folds = find_layer_bn(model) if cfg.fold_bn else {}
    owners = out_projections(model)
    folded: list[str] = []
    depth: dict[str, int] = {}  # weight quantizers of each method so far: their layer_index
    for lp in plan:
        m = lp.module
        if lp.specs["weight"] is not None:
            for wname in weight_names(m):  # weight; an attention's q/k/v projection
                q = build_quantizer(lp.specs["weight"], "weight")
                q.bind(m)
                q.__dict__["layer_name"] = lp.name
                q.__dict__["layer_index"] = depth[q.name] = depth.get(q.name, -1) + 1
                if m in folds and wname == "weight":
                    parametrize.register_parametrization(m, "weight", FoldScale(folds[m][1]))
                    m.register_forward_hook(unfold_output)
                    folded.append(f"{lp.name}+{folds[m][0]}")
                with torch.no_grad():
                    q.init_from(getattr(m, wname))
                parametrize.register_parametrization(m, wname, q)
        if lp.specs["act"] is not None:
            q = build_quantizer(lp.specs["act"], "act")
            q.bind(m)
            q.__dict__["layer_name"] = lp.name
            m.add_module("input_quantizer", q)
            if isinstance(m, nn.MultiheadAttention):
                m.register_forward_pre_hook(quantize_attention_inputs, with_kwargs=True)
            else:
                m.register_forward_pre_hook(_quantize_input)
                if hasattr(q, "output_scale"):
                    m.register_forward_hook(_scale_output)
        if lp.specs["grad"] is not None:
            q = build_quantizer(lp.specs["grad"], "grad")
            q.bind(m)
            q.__dict__["layer_name"] = lp.name
            m.add_module("grad_quantizer", q)
            if m in owners:  # out_proj's forward never runs: its output is the attention's
                owners[m][1].register_forward_hook(quantize_out_proj_grad)
            else:
                m.register_forward_hook(_quantize_output_grad)
    _warn_missing_batch_norm(model, plan)
    relus = replace_relu(model, cfg.replace_relu) if cfg.replace_relu else []
    model.__dict__["_dqt_plan"] = plan
    log.info("qat %s: per-layer plan\n%s%s%s", cfg.name, format_plan(plan),
             f"\nBN folded: {', '.join(folded)}" if cfg.fold_bn else "",
             f"\nReLU → {cfg.replace_relu}: {', '.join(relus)}" if relus else "")
    return model


def _warn_missing_batch_norm(model: nn.Module, plan: list[LayerPlan]) -> None:
    """Warn about layers whose weight quantizer assumes a BatchNorm after them (BNN, DoReFa
    k > 1: see ``Quantizer.assumes_batch_norm``) when none follows — a silent collapse to chance
    accuracy otherwise."""
    followed = find_layer_bn(model)
    for lp in plan:
        q = layer_quantizers(lp.module)["weight"]
        why = q.assumes_batch_norm() if q is not None else None
        if why and lp.module not in followed:
            log.warning("qat: %s on %s assumes a BatchNorm after the layer as in its paper (%s); "
                        "none follows it, so activations grow with the fan-in and training may "
                        "stall: use a model with BatchNorm (model.batch_norm=true for mlp/cnn)",
                        q.describe(), lp.name, why)


def weight_quantizer(module: nn.Module, name: str = "weight") -> Optional[Quantizer]:
    """The quantizer of ``module``'s weight tensor ``name`` (None: not quantized)."""
    if not parametrize.is_parametrized(module, name):
        return None
    qs = [p for p in module.parametrizations[name] if isinstance(p, Quantizer)]
    return qs[-1] if qs else None


def weight_quantizers(module: nn.Module) -> dict[str, Quantizer]:
    """Weight tensor name → its quantizer, for every quantized weight tensor of ``module``
    (``weight``; an attention's ``in_proj_weight`` or ``q/k/v_proj_weight``)."""
    out = {}
    for name in weight_names(module):
        q = weight_quantizer(module, name)
        if q is not None:
            out[name] = q
    return out


def layer_quantizers(module: nn.Module) -> dict[str, Optional[Quantizer]]:
    """slot → the layer's quantizer (weight: the first of its weight tensors')."""
    return {"weight": next(iter(weight_quantizers(module).values()), None),
            "act": getattr(module, "input_quantizer", None),
            "grad": getattr(module, "grad_quantizer", None)}


def format_plan(plan: list[LayerPlan]) -> str:
    rows = [("layer", "type", "weight", "act", "grad", "why")]
    for lp in plan:
        qs = layer_quantizers(lp.module)
        desc = [qs[s].describe() if qs[s] is not None else "fp32" for s in SLOTS]
        tensors = list(weight_quantizers(lp.module))
        if tensors and tensors != ["weight"]:
            desc[0] += " on " + ("in_proj_weight" if len(tensors) == 1 else "q/k/v_proj_weight")
        if qs["act"] is not None and isinstance(lp.module, nn.MultiheadAttention):
            desc[1] += " on query/key/value"
        for i, s in enumerate(SLOTS):
            if s in lp.notes:
                desc[i] = f"— ({lp.notes[s]})"
        cls = type(lp.module)
        if parametrize.is_parametrized(lp.module):
            cls = cls.__bases__[0]  # ParametrizedLinear -> Linear
        rows.append((lp.name, cls.__name__, *desc, lp.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@torch.no_grad()
def qat_penalty(model: nn.Module) -> None:
    """Before an optimizer step (gradients all-reduced and unscaled): add the weight quantizers'
    penalty gradients (``Quantizer.add_penalty_grad``: ADMM's augmented term)."""
    for m in model.modules():
        for name, q in weight_quantizers(m).items():
            q.add_penalty_grad(m.parametrizations[name].original)


@torch.no_grad()
def qat_step(model: nn.Module) -> None:
    """After an optimizer step: sync + commit quantizer statistics, apply weight constraints."""
    commit_stats(model)
    for m in model.modules():
        for name, q in weight_quantizers(m).items():
            q.after_step(m.parametrizations[name].original)


@torch.no_grad()
def commit_stats(model: nn.Module) -> None:
    """MAX-reduce the statistics every stateful quantizer recorded (over ranks, in one
    collective, when a process group is up) and commit them."""
    stateful = [m for m in model.modules() if isinstance(m, Quantizer) and m.stateful]
    pending = [(q, s) for q in stateful if (s := q.stats()) is not None]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    for op in ("max", "sum"):  # one collective per reduction that some quantizer asks for
        group = [(q, s) for q, s in pending if q.reduce == op]
        if not group:
            continue
        flat = torch.cat([s.detach().float().reshape(-1).to(device) for _, s in group])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        flat = flat.cpu()
        i = 0
        for q, s in group:
            q.commit(flat[i:i + s.numel()])
            i += s.numel()

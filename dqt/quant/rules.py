"""Which quantizers go on which layer: ordered rules, first match wins.

A layer is any module that is an instance of a supported type (``Linear``, ``Conv1d``,
``Conv2d``, ``Conv3d``, ``Embedding``, ``MultiheadAttention`` or a subclass — users' own models
work, no tracing).
For each layer, in ``model.named_modules()`` order:

1. the first rule of ``qat.rules`` that matches it gives its whole plan (a slot the rule leaves
   out stays full precision). ``match`` is an exact module name, a glob (``*``, ``?``, ``[``:
   ``layer2.*``) or ``re:<regex>`` (``re.fullmatch``); ``type`` is a class name (``Linear``) or
   a dotted path (``torch.nn.Linear``) matched against the module's class and its bases; a
   rule with both needs both;
2. otherwise, with ``keep_first_last``, the first and the last layer whose type is in
   ``qat.types`` stay full precision (DoReFa, XNOR, TTQ all do this);
3. otherwise a layer whose type is in ``qat.types`` gets ``qat.default``.

With ``strict``, a rule that matches no layer is an error naming ``qat.rules[i]``. A slot
whose quantizer would never run (``dqt.quant.attention.unreachable``: an input quantizer on the
``out_proj`` of an ``nn.MultiheadAttention``, ...) is an error when a rule puts it there, and
left empty, with the reason in the plan, when it comes from ``qat.default``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from dqt.errors import ConfigError
from dqt.quant.attention import out_projections, unreachable
from dqt.quant.base import QUANTIZERS

SUPPORTED: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d,
    "Embedding": nn.Embedding, "MultiheadAttention": nn.MultiheadAttention,
}
SLOTS = ("weight", "act", "grad")


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    specs: dict[str, Any]  # slot -> QuantizerConfig (or None)
    source: str  # "rules[1]", "default", "first layer", "last layer", "not in qat.types"
    #: slot → why nothing is attached there although the rule or default names a quantizer
    #: (an Embedding's input is integer ids; out_proj of an nn.MultiheadAttention is never called)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return any(v is not None for v in self.specs.values())


def is_layer(module: nn.Module) -> bool:
    return isinstance(module, tuple(SUPPORTED.values()))


def type_matches(type_name: str, module: nn.Module) -> bool:
    for cls in type(module).__mro__:
        if type_name in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return True
    return type_name.startswith("torch.nn.") and any(
        c.__name__ == type_name.rsplit(".", 1)[1] and c.__module__.startswith("torch.nn")
        for c in type(module).__mro__)


def name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def rule_matches(rule: Any, name: str, module: nn.Module) -> bool:
    if rule.match is not None and not name_matches(rule.match, name):
        return False
    if rule.type is not None and not type_matches(rule.type, module):
        return False
    return True


def _slots(x: Any) -> dict[str, Any]:
    return {s: getattr(x, s, None) for s in SLOTS}


def resolve(cfg: Any, model: nn.Module) -> list[LayerPlan]:
    """The plan for every layer of ``model`` (see the module docstring)."""
    layers = [(n, m) for n, m in model.named_modules() if n and is_layer(m)]
    in_types = [n for n, m in layers if any(type_matches(t, m) for t in cfg.types)]
    ends = {in_types[0]: "first layer", in_types[-1]: "last layer"} if (
        cfg.keep_first_last and in_types) else {}
    used = [False] * len(cfg.rules)
    plan: list[LayerPlan] = []
    for name, module in layers:
        hit: Optional[int] = next((i for i, r in enumerate(cfg.rules)
                                   if rule_matches(r, name, module)), None)
        if hit is not None:
            used[hit] = True
            plan.append(LayerPlan(name, module, _slots(cfg.rules[hit]), f"rules[{hit}]"))
        elif name in ends:
            plan.append(LayerPlan(name, module, _slots(None), f"{ends[name]} (keep_first_last)"))
        elif name in in_types:
            plan.append(LayerPlan(name, module, _slots(cfg.default), "default"))
        else:
            plan.append(LayerPlan(name, module, _slots(None), "not in qat.types"))
    _drop_unreachable(plan, model)
    if cfg.strict:
        for i, ok in enumerate(used):
            if not ok:
                r = cfg.rules[i]
                what = " and ".join(f"{k}={v!r}" for k, v in (("match", r.match), ("type", r.type))
                                    if v is not None)
                names = ", ".join(n for n, _ in layers)
                raise ConfigError(f"qat.rules[{i}]", f"{what} matches no layer (qat.strict=true); "
                                  f"the layers are: {names}")
    return plan


def _drop_unreachable(plan: list[LayerPlan], model: nn.Module) -> None:
    """Slots whose quantizer would never run (``dqt.quant.attention.unreachable``; an
    Embedding's input quantizer): a rule that puts one there is an error naming the rule's slot
    and the layer; from ``qat.default`` the slot is left empty and the plan says why."""
    owners = out_projections(model)
    for lp in plan:
        for slot, spec in lp.specs.items():
            if spec is None:
                continue
            if slot == "act" and isinstance(lp.module, nn.Embedding):
                lp.specs[slot], lp.notes[slot] = None, "integer ids"
                continue
            cls = QUANTIZERS.get(spec.name) if spec.name in QUANTIZERS else None
            why = unreachable(lp.module, slot, cls, lp.module in owners)
            if why is None:
                continue
            if lp.source.startswith("rules["):
                raise ConfigError(f"qat.{lp.source}.{slot}", f"{spec.name} on {lp.name}: {why[0]}; "
                                  f"give {lp.name} a rule without {slot} before this one")
            lp.specs[slot], lp.notes[slot] = None, why[1]

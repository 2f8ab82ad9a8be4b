"""Ristretto's bit-width search, the model-side half: the selection rule (a pure function of the
evaluated accuracies), the ``qat`` config a choice of bit-widths means, and the calibration of
activation ranges. The evaluation loop that fills the table is ``dqt.train.search_bits``.

Ristretto (Gysel, Motamedi & Ghiasi, "Hardware-oriented Approximation of Convolutional Neural
Networks", ICLR 2016 workshop, arXiv 1604.03168; Gysel et al., "Ristretto: A Framework for
Empirical Study of Resource-Efficient Inference in Convolutional Neural Networks", IEEE TNNLS
2018) quantizes a trained fp32 network in three **groups** — conv weights, fully connected
weights, layer activations — one group at a time, the rest staying fp32, at 16, 8, 4, 2, 1 bits
of dynamic fixed point, and keeps for each group the smallest width whose accuracy stays within
an error margin of the fp32 baseline. The **rule** implemented by :func:`select_bits`:

1. *Within the margin* means ``100 · (baseline − acc) ≤ error_margin`` (accuracy in [0, 1], the
   margin in percentage points: Ristretto's ``accuracy + error_margin/100 ≥ baseline``).
2. *Per group* (:func:`smallest_within`): walk the evaluated widths from the largest down; the
   group's width is the last one within the margin before the first one outside it (Ristretto's
   "else break": a width below a failing one is never taken even if it happens to pass). If the
   largest width already fails, the group stays fp32 (Ristretto's initial 32).
3. *Combined*: evaluate all groups at their widths together. Ristretto stops here, reports the
   combined accuracy and asks for fine-tuning. dqt goes on while the combined drop exceeds the
   margin (**step back up**): raise the group whose *individual* accuracy at its current width
   is the lowest (ties: conv, fc, act order) to its next larger evaluated width — above the
   largest, to fp32 — and evaluate the combination again. All groups at fp32 is the baseline,
   so this ends, and the final choice is always within the margin *on the evaluated numbers*.

Groups (:data:`GROUP_TYPES`): ``conv`` = the weights of every ``Conv1d/2d/3d``, ``fc`` = of every
``Linear``, ``act`` = the input activation of every such layer (dqt's ``act`` slot; Ristretto
also rounds layer outputs, which here are the next layer's inputs after BN/ReLU/pooling — only
the logits stay fp32). Embeddings stay fp32. The written config quantizes first and last layer
too (``keep_first_last: false``), as Ristretto does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from dqt.errors import ConfigError
from dqt.quant.config import QuantizerConfig
from dqt.quant.base import QUANTIZERS, Quantizer
from dqt.quant.prepare import commit_stats
from dqt.quant.rules import type_matches
from dqt.quant.config import quantizer_class

GROUPS = ("conv", "fc", "act")
LABELS = {"conv": "conv weights", "fc": "fc weights", "act": "activations"}
GROUP_TYPES = {"conv": ("Conv1d", "Conv2d", "Conv3d"), "fc": ("Linear",)}
Bits = Optional[int]  # None = full precision (fp32)
Table = Mapping[str, Mapping[int, Optional[float]]]  # group -> bits -> accuracy (None: not run)
EPS = 1e-9  # float slack in the margin test (accuracies are ratios of counts)


def drop_points(baseline: float, acc: float) -> float:
    """Accuracy drop below the baseline in percentage points (negative: better)."""
    return 100.0 * (baseline - acc)


def within(baseline: float, acc: float, margin: float) -> bool:
    return drop_points(baseline, acc) <= margin + EPS


def smallest_within(row: Mapping[int, Optional[float]], baseline: float, margin: float) -> Bits:
    """Rule 2: from the largest evaluated width down, the last within the margin before the
    first outside it; None (fp32) if the largest fails or nothing was evaluated."""
    best: Bits = None
    for bits in sorted((b for b, a in row.items() if a is not None), reverse=True):
        if not within(baseline, row[bits], margin):  # type: ignore[arg-type]
            break
        best = bits
    return best


def next_up(row: Mapping[int, Optional[float]], bits: Bits) -> Bits:
    """The next larger evaluated width of a group; above the largest, None (fp32)."""
    if bits is None:
        return None
    larger = [b for b, a in row.items() if a is not None and b > bits]
    return min(larger) if larger else None


@dataclass
class Selection:
    individual: dict[str, Bits]  # rule 2, per group
    chosen: dict[str, Bits]  # after rule 3
    acc: float  # the chosen combination's evaluated accuracy
    trials: list[tuple[dict[str, Bits], float]] = field(default_factory=list)  # rule 3, in order

    @property
    def stepped_up(self) -> bool:
        return len(self.trials) > 1


def select_bits(table: Table, baseline: float, margin: float,
                evaluate: Callable[[dict[str, Bits]], float]) -> Selection:
    """The module docstring's rule. ``table[group][bits]`` is the accuracy with only that group
    quantized at that width (None: not evaluated, e.g. a width the quantizer refuses);
    ``evaluate(bits per group)`` is the accuracy of a combination (called only for combinations
    with at least one quantized group)."""
    groups = [g for g in GROUPS if g in table]
    individual = {g: smallest_within(table[g], baseline, margin) for g in groups}
    chosen = dict(individual)
    trials: list[tuple[dict[str, Bits], float]] = []
    while True:
        acc = evaluate(dict(chosen)) if any(b is not None for b in chosen.values()) else baseline
        trials.append((dict(chosen), acc))
        if within(baseline, acc, margin):
            return Selection(individual, chosen, acc, trials)
        g = min((g for g in groups if chosen[g] is not None),
                key=lambda g: (table[g][chosen[g]], groups.index(g)))  # type: ignore[index]
        chosen[g] = next_up(table[g], chosen[g])


# --------------------------------------------------------------------------- the qat config
def spec(quantizer: str, bits: int, kind: str, act_momentum: Optional[float]) -> dict[str, Any]:
    """One slot's quantizer: ``{name, bits}``, plus ``momentum`` for activations when the
    quantizer takes it (an EMA range, calibrated before evaluation)."""
    out: dict[str, Any] = {"name": quantizer, "bits": bits}
    if (kind == "act" and act_momentum is not None
            and "momentum" in QUANTIZERS.get(quantizer).arg_names()):
        out["momentum"] = act_momentum
    return out


def refusal(quantizer: str, bits: int, kind: str, act_momentum: Optional[float]) -> Optional[str]:
    """Why ``quantizer`` cannot quantize a ``kind`` at ``bits`` (its own argument check), or None."""
    try:
        quantizer_class(QuantizerConfig(**spec(quantizer, bits, kind, act_momentum)), kind, "q")
    except ConfigError as e:
        return str(e).split(": ", 1)[1] if ": " in str(e) else str(e)
    return None


def layer_types(model: nn.Module) -> dict[str, list[str]]:
    """group -> the class names (of :data:`GROUP_TYPES`) present in ``model``, in order."""
    found: dict[str, list[str]] = {"conv": [], "fc": []}
    for _, m in model.named_modules():
        for g, types in GROUP_TYPES.items():
            for t in types:
                if type_matches(t, m) and t not in found[g]:
                    found[g].append(t)
    return found


def qat_dict(bits: Mapping[str, Bits], quantizer: str, types: Mapping[str, list[str]],
             name: str, act_momentum: Optional[float]) -> dict[str, Any]:
    """The ``qat`` config of a choice: one rule per layer type (``type: Conv2d`` → conv weights
    + input activations, ``type: Linear`` → fc weights + input activations); a slot at fp32 is
    left out, a rule with no slot is left out; first and last layer are quantized too."""
    rules = []
    for group in ("conv", "fc"):
        for t in types.get(group, []):
            rule: dict[str, Any] = {"type": t}
            if bits.get(group) is not None:
                rule["weight"] = spec(quantizer, bits[group], "weight", act_momentum)  # type: ignore[arg-type]
            if bits.get("act") is not None:
                rule["act"] = spec(quantizer, bits["act"], "act", act_momentum)  # type: ignore[arg-type]
            if len(rule) > 1:
                rules.append(rule)
    return {"name": name, "rules": rules, "keep_first_last": False}


def qat_yaml(d: Mapping[str, Any], header: str = "") -> str:
    """A ``conf/qat/NAME.yaml`` file: extends the qat schema, like every preset."""
    import yaml

    lines = [f"# {h}".rstrip() for h in header.splitlines()] if header else []
    lines += ["defaults:", "  - /schema/qat@_here_: qat", "  - _self_"]
    body = yaml.safe_dump(dict(d), sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(lines) + "\n" + body


# --------------------------------------------------------------------------- calibration
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Record the ranges stateful quantizers keep (EMA activation ranges, LSQ's first-batch
    step, Autoflex) on ``batches`` and commit them; returns the number of batches run.

    The forward passes run with the *model* in eval mode (BatchNorm keeps its running
    statistics, dropout is off) and only the quantizers in train mode with autograd on — what
    :attr:`Quantizer.recording` asks for; parameters are frozen meanwhile, so no graph is kept.
    One commit at the end (:func:`dqt.quant.prepare.commit_stats`, MAX over ranks if a process
    group is up): an EMA range's first commit *sets* it, so the range is the max|x| over all
    calibration batches — Ristretto's integer length from the largest value seen. An
    uncalibrated range would fall back to each evaluation batch's own range."""
    qs = [m for m in model.modules() if isinstance(m, Quantizer) and m.stateful]
    if not qs:
        return 0
    was = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    n = 0
    try:
        model.eval()
        for q in qs:
            q.train()
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            for x in batches:
                model(x)
                n += 1
        commit_stats(model)
    finally:
        for p, r in frozen:
            p.requires_grad_(r)
        model.train(was)
    logging.getLogger("dqt").debug("calibrated %d quantizers on %d batches", len(qs), n)
    return n

"""Validation of the ``qat`` config (called from ``QATConfig.__post_init__``), so a bad
quantizer name, argument or rule stops the run before any work, naming the full key
(``qat.rules[2].weight.bits: must be in [1, 8]; got 0``)."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

from dqt.config import ConfigError, check
from dqt.quant.base import QUANTIZERS, ArgError, Quantizer
from dqt.quant.rules import SLOTS, SUPPORTED

RELU_REPLACEMENTS = ("hardtanh", "identity")


def spec_args(spec: Any) -> dict[str, Any]:
    """A ``QuantizerConfig`` → the arguments it sets (nulls dropped)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec)
            if f.name != "name" and getattr(spec, f.name) is not None}


def quantizer_class(spec: Any, kind: str, key: str) -> type[Quantizer]:
    """Check one slot's spec; return its class. ``key`` is e.g. ``qat.default.weight``."""
    check(spec.name in QUANTIZERS, f"{key}.name",
          f"unknown quantizer '{spec.name}'; available: {', '.join(QUANTIZERS.names())}")
    cls = QUANTIZERS.get(spec.name)
    check(kind in cls.kinds, f"{key}.name",
          f"{spec.name} quantizes {'/'.join(cls.kinds)}, not {kind}; "
          f"{kind} quantizers: {', '.join(n for n in QUANTIZERS.names() if kind in QUANTIZERS.get(n).kinds)}")
    args = spec_args(spec)
    takes = cls.arg_names()
    for a in args:
        check(a in takes, f"{key}.{a}",
              f"{spec.name} does not take {a} (it takes: {', '.join(takes) or 'nothing'})")
    try:
        cls.check(kind, args)
    except ArgError as e:
        raise ConfigError(f"{key}.{e.field}" if e.field else key, e.msg) from None
    return cls


def validate_qat(cfg: Any) -> None:
    check(cfg.quantizer_lr_mult > 0, "qat.quantizer_lr_mult",
          f"must be > 0 (the quantizer parameters' lr is optim.lr times it); "
          f"got {cfg.quantizer_lr_mult}")
    check(cfg.quantizer_weight_decay >= 0, "qat.quantizer_weight_decay",
          f"must be >= 0; got {cfg.quantizer_weight_decay}")
    check(cfg.replace_relu is None or cfg.replace_relu in RELU_REPLACEMENTS, "qat.replace_relu",
          f"must be one of {', '.join(RELU_REPLACEMENTS)} (or null); got '{cfg.replace_relu}'")
    for i, t in enumerate(cfg.types):
        check(t in SUPPORTED, f"qat.types[{i}]",
              f"must be one of {', '.join(SUPPORTED)}; got '{t}'")
    for slot in SLOTS:
        spec = getattr(cfg.default, slot)
        if spec is not None:
            quantizer_class(spec, slot, f"qat.default.{slot}")
    for i, rule in enumerate(cfg.rules):
        key = f"qat.rules[{i}]"
        check(rule.match is not None or rule.type is not None, key,
              "needs match (name, glob or re:regex) or type (module class name)")
        if rule.match is not None and rule.match.startswith("re:"):
            try:
                re.compile(rule.match[3:])
            except re.error as e:
                raise ConfigError(f"{key}.match", f"bad regular expression '{rule.match[3:]}': {e}") \
                    from None
        for slot in SLOTS:
            spec = getattr(rule, slot)
            if spec is not None:
                quantizer_class(spec, slot, f"{key}.{slot}")

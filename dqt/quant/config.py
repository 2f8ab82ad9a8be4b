"""The ``qat`` config: which quantizer goes on which tensor of which layer, validated where it
is defined, so a bad quantizer name, argument or rule stops the run before any work, naming the
full key (``qat.rules[2].weight.bits: must be in [1, 8]; got 0``).

A quantizer's arguments are defined and checked in one place, its own ``Config`` dataclass
(``dqt.quant.methods``). The slot type users write in YAML (``weight: {name: lsq, bits: 4}``),
:data:`QuantizerConfig`, is generated from them when this module is imported: ``name`` plus
every registered quantizer's fields, each optional; validation builds the named quantizer's own
``Config`` from the slot's non-null values (:func:`method_config`)."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Optional, Union

from omegaconf import MISSING

from dqt.errors import ConfigError, check
from dqt.quant import methods  # noqa: F401  (registers every quantizer)
from dqt.quant.base import QUANTIZERS, ArgError, Quantizer
from dqt.quant.rules import SLOTS, SUPPORTED


# --------------------------------------------------------------------------- the slot type
def _base_type(tp: Any) -> Any:
    """``Optional[T]`` → ``T`` (any other type as it is)."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def slot_config_class(classes: Iterable[type[Quantizer]]) -> type:
    """The ``QuantizerConfig`` dataclass of the quantizers ``classes``: ``name``, then every
    field of their ``Config`` dataclasses (first appearance first), each ``Optional`` with
    default None. A field that two quantizers declare with different types (``Optional[T]``
    and ``T`` are the same) raises ``TypeError``: one YAML key would mean two things."""
    types: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            tp = _base_type(hints[f.name])
            if f.name in types and types[f.name] != tp:
                raise TypeError(f"quantizer argument '{f.name}' is {types[f.name]} in "
                                f"{', '.join(owners[f.name])} but {tp} in {cls.name}; an "
                                "argument name must have one type across quantizers")
            types.setdefault(f.name, tp)
            owners.setdefault(f.name, []).append(cls.name)
    doc = ["One tensor's quantizer: ``name`` from the quantizer registry",
           "(``dqt.quant.QUANTIZERS``) and its arguments. A null argument takes the quantizer's",
           "default; setting an argument the quantizer does not take is an error naming the key",
           "(``qat.rules[1].weight.t...``).",
           "",
           "Generated from the registered quantizers' ``Config`` dataclasses (their fields",
           "document each argument); the arguments and the quantizers that take them:",
           ""]
    doc += [f"* ``{n}`` ({t.__name__ if isinstance(t, type) else t}): {', '.join(owners[n])}"
            for n, t in types.items()]
    slot = dataclasses.make_dataclass(
        "QuantizerConfig",
        [("name", str, field(default=MISSING))]
        + [(n, Optional[t], field(default=None)) for n, t in types.items()],
        namespace={"__module__": __name__, "__doc__": "\n".join(doc)})
    return slot


QuantizerConfig = slot_config_class(QUANTIZERS.get(n) for n in QUANTIZERS.names())


@dataclass
class QATSlotsConfig:
    """The quantizers of one layer: its weight, its input activation, and the gradient flowing
    back into its output (identity forward). null = full precision."""

    weight: Optional[QuantizerConfig] = None
    act: Optional[QuantizerConfig] = None
    grad: Optional[QuantizerConfig] = None


@dataclass
class QATRuleConfig(QATSlotsConfig):
    """``match``: exact module name, glob (``layer2.*``) or ``re:<regex>`` (full match);
    ``type``: module class name (``Linear``, ``Conv2d``, ``torch.nn.Embedding``). With both, both
    must hold. The first matching rule is the layer's whole plan (slots it omits stay fp)."""

    match: Optional[str] = None
    type: Optional[str] = None


@dataclass
class QATConfig:
    """Quantization-aware training: ordered ``rules`` (first match wins), then the ``default``
    for every other quantizable layer (``types``); ``keep_first_last`` leaves the first and last
    quantizable layers in full precision unless a rule names them; ``strict`` makes a rule that
    matches no layer an error. ``fold_bn`` folds a BatchNorm into the conv or Linear before it;
    ``replace_relu`` swaps ``nn.ReLU`` modules (hardtanh/identity: binary activations need a
    signed input). ``none`` (no quantizer anywhere) trains in full precision.

    Quantizer parameters (TTQ W_p/W_n, LSQ s, PACT α; ``dqt.quant.quantizer_parameters``) get
    their own optimizer param group: learning rate ``optim.lr × quantizer_lr_mult`` (same
    schedule) and weight decay ``quantizer_weight_decay`` (0: scales are not decayed; PACT's L2
    penalty on α goes here)."""

    name: str = "none"
    default: QATSlotsConfig = field(default_factory=QATSlotsConfig)
    rules: list[QATRuleConfig] = field(default_factory=list)
    keep_first_last: bool = True
    strict: bool = False
    types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Embedding",
                                                      "MultiheadAttention"])
    fold_bn: bool = False
    replace_relu: Optional[str] = None
    quantizer_lr_mult: float = 1.0
    quantizer_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        validate_qat(self)


# --------------------------------------------------------------------------- validation
RELU_REPLACEMENTS = ("hardtanh", "identity")


def spec_args(spec: Any) -> dict[str, Any]:
    """A ``QuantizerConfig`` → the arguments it sets (nulls dropped)."""
    return {f.name: getattr(spec, f.name) for f in fields(spec)
            if f.name != "name" and getattr(spec, f.name) is not None}


def method_config(spec: Any, kind: str, key: str) -> tuple[type[Quantizer], Quantizer.Config]:
    """Check one slot's spec; return its quantizer class and that class's own ``Config`` built
    from the arguments the spec sets. ``key`` is e.g. ``qat.default.weight``; an argument error
    is a :class:`ConfigError` naming ``key.<argument>``."""
    check(spec.name in QUANTIZERS, f"{key}.name",
          f"unknown quantizer '{spec.name}'; available: {', '.join(QUANTIZERS.names())}")
    cls = QUANTIZERS.get(spec.name)
    kind_names = [n for n in QUANTIZERS.names() if kind in QUANTIZERS.get(n).kinds]
    check(kind in cls.kinds, f"{key}.name",
          f"{spec.name} quantizes {'/'.join(cls.kinds)}, not {kind}; "
          f"{kind} quantizers: {', '.join(kind_names)}")
    args = spec_args(spec)
    takes = cls.arg_names()
    for a in args:
        check(a in takes, f"{key}.{a}",
              f"{spec.name} does not take {a} (it takes: {', '.join(takes) or 'nothing'})")
    try:
        cfg = cls.Config(**args)
        cfg.check_kind(kind)
    except ArgError as e:
        raise ConfigError(f"{key}.{e.field}" if e.field else key, e.msg) from None
    return cls, cfg


def quantizer_class(spec: Any, kind: str, key: str) -> type[Quantizer]:
    """Check one slot's spec (:func:`method_config`); return its quantizer class."""
    return method_config(spec, kind, key)[0]


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

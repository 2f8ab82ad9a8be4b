"""The ``qat`` config: which quantizer goes on which tensor of which layer, validated where it
is defined, so a bad quantizer name, argument or rule stops the run before any work, naming the
full key (``qat.rules[2].weight.bits: must be in [1, 8]; got 0``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import MISSING

from dqt.errors import ConfigError, check
from dqt.quant.base import QUANTIZERS, ArgError, Quantizer
from dqt.quant.rules import SLOTS, SUPPORTED

@dataclass
class QuantizerConfig:
    """One tensor's quantizer: ``name`` from the quantizer registry (``dqt.quant.QUANTIZERS``)
    and its arguments. A null argument takes the quantizer's default; setting an argument the
    quantizer does not take is an error naming the key (``qat.rules[1].weight.t...``)."""

    name: str = MISSING
    bits: Optional[int] = None  # bit-width (mantissa bits for flex)
    per_channel: Optional[bool] = None  # one scale per output channel (weights)
    frac_bits: Optional[int] = None  # fixed point: fractional bits (the seed's ``sf``)
    exp_bits: Optional[int] = None  # minifloat / flex exponent bits
    mant_bits: Optional[int] = None  # minifloat mantissa bits
    step: Optional[float] = None  # QNN LinearQuant step s
    min_val: Optional[float] = None  # QNN clip minV
    max_val: Optional[float] = None  # QNN clip maxV
    fsr: Optional[int] = None  # log quantizer full-scale range (exponent of the largest level)
    momentum: Optional[float] = None  # EMA range observer: weight of the new batch
    stochastic: Optional[bool] = None  # BNN / BinaryConnect stochastic binarization
    threshold: Optional[float] = None  # TWN Δ factor (0.7), TTQ t (0.05)
    init: Optional[float] = None  # PACT α₀, LSQ s₀, TTQ W_p/W_n (null = derived from data)
    history: Optional[int] = None  # Autoflex: maxima kept per tensor
    order: Optional[int] = None  # HORQ residual order
    rescale: Optional[bool] = None  # DoReFa k>1: scale the weights by mean|W| (no BatchNorm)
    rho: Optional[float] = None  # ADMM penalty ρ (ρ/2·‖W − G + λ‖²)
    every: Optional[int] = None  # ADMM: optimizer steps between G/λ updates
    iters: Optional[int] = None  # ADMM projection / AQN alternations / Q-CNN k-means / BWNH / FFN SDD inner iterations
    ste: Optional[bool] = None  # ADMM: forward G with an identity STE (default: W, as the paper)
    approx: Optional[str] = None  # balanced: percentiles by median (exact) or mean (cheap)
    uniform: Optional[bool] = None  # HWGQ: uniform (the paper's) or Lloyd non-uniform levels
    sub_dim: Optional[int] = None  # Q-CNN product quantization: dimensions per subspace
    rank: Optional[int] = None  # FFN: number of ternary rank-1 terms (null: min(N, K))
    response: Optional[bool] = None  # Q-CNN: minimise the layer-response error ‖(W − Ŵ)ᵀX‖
    grad_bits: Optional[int] = None  # WAGE k_G: bits of the weight gradient (null: fp32)
    grad_lr: Optional[float] = None  # WAGE η: the learning rate inside Q_G (a power of two)
    centroid_init: Optional[str] = None  # kmeans: linear | density | random
    cluster_step: Optional[int] = None  # kmeans: optimizer step of the clustering (0 = at attach)
    schedule: Optional[list[float]] = None  # INQ: share of weights quantized at each stage
    stage_steps: Optional[int] = None  # INQ: optimizer steps per stage
    terms: Optional[int] = None  # ShiftCNN: N power-of-two terms per weight


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
    types: list[str] = field(default_factory=lambda: ["Linear", "Conv1d", "Conv2d", "Embedding"])
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

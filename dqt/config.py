"""The trainer's typed configuration: :class:`TrainConfig` and the schemas of the trainer's own
groups (optim, precision, logger, backend, checkpoint, the bit-width search). The components'
configs are defined where the components live — ``scheme`` in :mod:`dqt.comm.config`, ``qat``
in :mod:`dqt.quant.config`, ``model`` in :mod:`dqt.train.models`, ``data`` in
:mod:`dqt.train.data` — and composed here; all are stored in Hydra's ConfigStore by
:func:`register_configs`.

Each YAML file under ``conf/<group>/`` extends its schema explicitly
(``defaults: [/schema/<group>@_here_: <option>, _self_]``), so Hydra's struct mode rejects
typo'd keys and wrong types at composition time, and ``__post_init__`` rejects out-of-range
values when :func:`to_typed` turns the composed config into these objects. Every error names
the full config key (``optim.lr``, ``data.root``, ...) so the user knows which knob to turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from dqt.comm.config import SCHEME_CONFIGS, CompressedConfig
from dqt.errors import ConfigError, check, check_finite_floats
from dqt.errors import check_bool as _check_bool
from dqt.errors import check_choice as _choice
from dqt.quant.config import QATConfig
from dqt.train.data import (LM_DATA, TOKEN_DATA, CIFAR10Config, DigitsConfig, MNISTConfig,
                            ShakespeareConfig, SortConfig, SyntheticConfig, TextConfig)
from dqt.train.models import CNNConfig, GPTConfig, MLPConfig, ResNetConfig, TransformerConfig

__all__ = ["ConfigError", "TrainConfig", "SearchBitsConfig", "register_configs", "to_typed"]


# sequence models and the data they train on (the rest are classifiers of classification data)
SEQUENCE_MODELS = {"gpt": (LM_DATA, "language-model data"),
                   "transformer": (TOKEN_DATA, "token-classification data")}

# --------------------------------------------------------------------------- optim
OPTIMIZERS = ("sgd", "adamw", "adam", "onebit_adam")


@dataclass
class OptimConfig:
    """Optimizer and LR schedule (linear warm-up, then ``schedule``). ``onebit_adam``: AdamW
    whose variance freezes after ``freeze_steps`` uncompressed steps, after which the momentum
    is averaged through the codec of ``+scheme=`` (default ``onebit``) with error feedback
    (:mod:`dqt.comm.onebit_adam`)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    freeze_steps: int = 100
    """Steps of uncompressed Adam(W) that estimate its variance before it freezes:
    ``onebit_adam`` always; ``adam``/``adamw`` when a dqt codec compresses the gradients (the
    scheme's warm-up is extended to cover them) and ``freeze_variance`` is on."""
    freeze_variance: bool = True
    """``adam``/``adamw`` under a dqt codec (not signsgd's vote): freeze the variance after
    ``freeze_steps``. Off, the codec's noise inflates Adam's variance (docs/comm.md)."""
    precondition: bool = True
    """With the variance frozen: the codec compresses each gradient divided by Adam's frozen
    √v̂ + ε, clamped to Adam's step bound ±1/√(1 − β₂), and the average is multiplied back
    (the same average up to the clamp; the codec's error then lands in proportion to each
    coordinate's step). Measured in docs/results.md: on the sort transformer it took
    ``ternary_grad`` from 0.74 to 0.35 eval loss (fp32: 0.41)."""

    def __post_init__(self) -> None:
        _choice(self.name, OPTIMIZERS, "optim.name")
        check(self.freeze_steps >= 1, "optim.freeze_steps",
              f"must be >= 1 (the variance is estimated from uncompressed steps); got {self.freeze_steps}")
        check(self.lr > 0, "optim.lr", f"must be > 0; got {self.lr}")
        check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1); got {self.momentum}")
        check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0; got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim.betas",
              f"must be two values in [0, 1); got {list(self.betas)}")
        check(self.eps > 0, "optim.eps", f"must be > 0; got {self.eps}")
        _choice(self.schedule, ("constant", "cosine", "linear"), "optim.schedule")
        check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0; got {self.warmup_steps}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio",
              f"must be in [0, 1]; got {self.min_lr_ratio}")
        check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off); got {self.grad_clip}")


# --------------------------------------------------------------------------- precision
@dataclass
class PrecisionConfig:
    """Autocast dtype; fp16 adds dynamic loss scaling (GradScaler)."""

    name: str = "fp32"
    init_scale: float = 65536.0
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        _choice(self.name, ("fp32", "bf16", "fp16"), "precision.name")
        check(self.init_scale > 0, "precision.init_scale", f"must be > 0; got {self.init_scale}")
        check(self.growth_interval > 0, "precision.growth_interval",
              f"must be > 0; got {self.growth_interval}")


# --------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """metrics.jsonl is always written by rank 0; ``wandb`` adds a W&B run.

    ``mode``: online | offline | disabled; the environment variable WANDB_MODE wins if set.
    """

    name: str = "jsonl"
    mode: str = "offline"
    project: str = "dqt"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choice(self.name, ("jsonl", "wandb"), "logger.name")
        _choice(self.mode, ("online", "offline", "disabled"), "logger.mode")


# --------------------------------------------------------------------------- backend
@dataclass
class BackendConfig:
    """Process-group backend: auto = nccl when CUDA is available, else gloo; horovod = the
    gradients over Horovod's collectives (launched by ``horovodrun``; :mod:`dqt.comm.horovod`)."""

    name: str = "auto"
    timeout_s: int = 600
    bucket_cap_mb: Optional[float] = None
    """Gradient bucket size in MiB (DDP's ``bucket_cap_mb``; the Horovod backend builds the
    same buckets). None: DDP's default, 25 MiB with a first bucket of 1 MiB; a value sets
    every bucket's cap, the first included (as DDP does)."""
    parallel: str = "ddp"
    """``ddp``: every rank holds the whole model, gradients all-reduced (DDP, or Horovod);
    ``fsdp``: FSDP2's ``fully_shard`` — parameters, gradients and optimizer state sharded over
    the ranks, gradients reduce-scattered (through the scheme's codec: :mod:`dqt.comm.fsdp`),
    checkpoints through ``torch.distributed.checkpoint``."""
    fsdp_gather: str = "fp32"
    """``parallel=fsdp``: the dtype in which FSDP all-gathers the parameters for forward and
    backward. ``bf16`` halves that traffic (ZeRO++'s quantized weights at 16 bits): the model
    computes with bf16-rounded copies of its fp32 parameters, which the optimizer updates
    exactly."""

    def __post_init__(self) -> None:
        _choice(self.name, ("auto", "gloo", "nccl", "horovod"), "backend.name")
        _choice(self.parallel, ("ddp", "fsdp"), "backend.parallel")
        _choice(self.fsdp_gather, ("fp32", "bf16"), "backend.fsdp_gather")
        check(self.fsdp_gather == "fp32" or self.parallel == "fsdp", "backend.fsdp_gather",
              "applies to backend.parallel=fsdp only")
        check(self.timeout_s > 0, "backend.timeout_s", f"must be > 0; got {self.timeout_s}")
        check(self.bucket_cap_mb is None or self.bucket_cap_mb > 0, "backend.bucket_cap_mb",
              f"must be > 0 (MiB) or null; got {self.bucket_cap_mb}")


# --------------------------------------------------------------------------- checkpoint
@dataclass
class CheckpointConfig:
    """Atomic checkpoints under ``<run_dir>/checkpoints/step_XXXXXXX``. ``init_from``: start
    from the model weights of another run (its directory or a ``checkpoints/step_*`` directory;
    fine-tuning, e.g. QAT from an fp32 run) — loaded before the quantizers attach, optimizer and
    step fresh; ignored when the run directory has a checkpoint of its own to resume."""

    every: int = 0  # steps between checkpoints; 0 = only at the end and on SIGTERM
    keep: int = 2  # newest complete checkpoints kept
    resume: bool = True  # resume from the newest complete checkpoint in the run directory
    allow_world_size_change: bool = False  # resume model+optimizer only, reset per-rank state
    allow_scheme_change: bool = False  # resume with another scheme; its state starts fresh
    init_from: Optional[str] = None  # weights of another run to start from (fine-tuning)
    reshard_residuals: bool = True
    """backend.parallel=fsdp, resumed on another number of ranks (with
    ``allow_world_size_change``): start every rank's error-feedback residuals from the mean of
    the saved ranks' (true: the not-yet-applied part of the average gradient is kept) or from
    zero (false: it is dropped)."""

    def __post_init__(self) -> None:
        check(self.every >= 0, "checkpoint.every", f"must be >= 0 (0 = end only); got {self.every}")
        check(self.keep >= 1, "checkpoint.keep", f"must be >= 1; got {self.keep}")


# --------------------------------------------------------------------------- top level
@dataclass
class TrainConfig:
    model: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    qat: Any = MISSING
    precision: Any = MISSING
    logger: Any = MISSING
    backend: Any = MISSING
    scheme: Any = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    steps: int = 300
    grad_accum: int = 1
    eval_every: int = 100  # 0 = evaluate only at the end
    log_every: int = 10
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise-reproducible runs)

    def __post_init__(self) -> None:
        check(self.steps > 0, "steps", f"must be > 0; got {self.steps}")
        check(self.grad_accum > 0, "grad_accum", f"must be > 0; got {self.grad_accum}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0 = end only); got {self.eval_every}")
        check(self.log_every > 0, "log_every", f"must be > 0; got {self.log_every}")
        self._check_model_fits_data()
        if getattr(self.backend, "name", None) == "horovod":
            self._check_horovod()
        if getattr(self.optim, "name", None) == "onebit_adam":
            self._check_onebit_adam()
        if getattr(self.backend, "parallel", "ddp") == "fsdp":
            self._check_fsdp()

    @property
    def frozen_variance(self) -> bool:
        """Adam(W) whose variance freezes after ``optim.freeze_steps`` uncompressed steps: a
        dqt codec that estimates the gradient (not signsgd's vote) compresses it."""
        return (getattr(self.optim, "name", None) in ("adam", "adamw")
                and bool(getattr(self.optim, "freeze_variance", False))
                and isinstance(self.scheme, CompressedConfig) and not self.scheme.vote)

    def _check_model_fits_data(self) -> None:
        """Sequence models train on their kind of sequence data, the others on classification
        data."""
        model, data = getattr(self.model, "name", "?"), getattr(self.data, "name", "?")
        owner = next((m for m, (ds, _) in SEQUENCE_MODELS.items() if data in ds), None)
        wants = SEQUENCE_MODELS.get(model, (None, None))[0]
        if (wants is None) == (owner is None) and (owner is None or owner == model):
            return
        key = "data" if wants is not None else "model"
        m = model if wants is not None else owner
        datas, kind = SEQUENCE_MODELS[m]
        check(False, key, f"model={m} trains on {' or '.join('data=' + d for d in datas)} "
                          f"({kind}) and the other models on classification data; "
                          f"got model={model} data={data}")

    def _check_onebit_adam(self) -> None:
        """optim=onebit_adam communicates the momentum through a dqt codec."""
        check(self.scheme is None or isinstance(self.scheme, CompressedConfig), "scheme.name",
              f"optim=onebit_adam compresses the momentum with a dqt codec (onebit, ef_signsgd, "
              f"signsgd, ternary_grad, qsgd); got {getattr(self.scheme, 'name', '?')}")
        check(not getattr(self.scheme, "vote", False), "scheme.name",
              "signsgd averages by majority vote, which keeps only the sign of the momentum; "
              "with optim=onebit_adam use onebit or ef_signsgd")
        check(not getattr(self.scheme, "auto", False), "scheme.auto",
              "not available with optim=onebit_adam (the optimizer communicates every step)")
        check(getattr(self.backend, "name", None) != "horovod", "backend.name",
              "optim=onebit_adam runs over torch.distributed (backend=gloo/nccl/auto)")

    def _check_fsdp(self) -> None:
        """What FSDP's sharded reduce-scatter cannot run (:mod:`dqt.comm.fsdp`)."""
        from dqt.comm.fsdp import fsdp_supported

        key = "backend.parallel"
        check(fsdp_supported(self.scheme), "scheme.name",
              f"'{getattr(self.scheme, 'name', self.scheme)}' cannot run with backend.parallel="
              "fsdp (it needs the whole gradient on every rank); FSDP takes onebit, "
              "ef_signsgd, signsgd, ternary_grad, qsgd, bf16, fp16 or no scheme")
        check(getattr(self.backend, "name", None) != "horovod", key,
              "fsdp runs over torch.distributed (backend.name=gloo or nccl), not horovod")
        check(getattr(self.optim, "name", None) != "onebit_adam", key,
              "optim=onebit_adam communicates momentum under DDP only; use backend.parallel=ddp")
        check(getattr(self.qat, "name", "none") == "none", key,
              f"qat={getattr(self.qat, 'name', '')} (parametrized weights) is not supported "
              "under fsdp; use backend.parallel=ddp")
        check(not getattr(self.scheme, "auto", False), "scheme.auto",
              "not supported with backend.parallel=fsdp")
        check(not self.frozen_variance, "optim.freeze_variance",
              "the frozen-variance Adam keeps its state in flat buffers over whole parameters, "
              "which FSDP shards; with backend.parallel=fsdp set optim.freeze_variance=false "
              "(torch's AdamW: the codec's noise then enters Adam's variance) or use SGD")

    def _check_horovod(self) -> None:
        """What backend=horovod cannot run, refused before any work starts."""
        name = getattr(self.scheme, "name", None)
        refused = {"bf16": "Horovod has no bfloat16 collectives (use +scheme=fp16 or a dqt "
                           "scheme)",
                   "powersgd": "PyTorch's PowerSGD hook issues torch.distributed collectives "
                               "itself (use a dqt scheme, or backend=gloo/nccl)"}
        check(name not in refused, "scheme.name",
              f"{name} does not run with backend=horovod: {refused.get(name)}")
        check(not getattr(self.scheme, "auto", False), "scheme.auto",
              "not available with backend=horovod (set scheme.auto=false, or use backend=gloo/nccl)")


# --------------------------------------------------------------------------- search_bits
@dataclass
class SearchConfig:
    """Ristretto's bit-width search (``launch/search_bits.py``, ``dqt.train.search_bits``):
    ``error_margin``: allowed drop of eval/acc below the fp32 baseline, in percentage points
    (Ristretto's ``--error_margin``); ``bits``: the widths tried per group (conv weights, fc
    weights, activations); ``quantizer``: a registered quantizer taking ``bits``;
    ``act_momentum``: EMA momentum of the activation range for quantizers that take
    ``momentum`` (null: dynamic_fixed uses each batch's own range); ``calib_batches``: training
    batches that calibrate activation ranges; ``name``: the written qat config's name (null:
    derived from the result); ``write``: also write it to this path (``conf/qat/NAME.yaml``);
    ``finetune``: then train with it from the checkpoint (``steps``, ``optim`` of this config)."""

    error_margin: float = 1.0
    bits: list[int] = field(default_factory=lambda: [16, 8, 4, 2, 1])
    quantizer: str = "dynamic_fixed"
    act_momentum: Optional[float] = 0.1
    calib_batches: int = 10
    name: Optional[str] = None
    write: Optional[str] = None
    finetune: bool = False

    def __post_init__(self) -> None:
        import re

        check(self.error_margin >= 0, "search.error_margin",
              f"must be >= 0 (percentage points of eval/acc); got {self.error_margin}")
        check(len(self.bits) > 0 and all(0 < b <= 32 for b in self.bits)
              and len(set(self.bits)) == len(self.bits), "search.bits",
              f"must be distinct bit-widths in [1, 32]; got {list(self.bits)}")
        check(self.act_momentum is None or 0 < self.act_momentum <= 1, "search.act_momentum",
              f"must be in (0, 1] or null; got {self.act_momentum}")
        check(self.calib_batches >= 1, "search.calib_batches",
              f"must be >= 1; got {self.calib_batches}")
        check(self.name is None or re.fullmatch(r"[A-Za-z0-9_]+", self.name) is not None,
              "search.name", f"must be letters, digits and _ (a config name); got '{self.name}'")
        _check_bool(self.finetune, "search.finetune")
        from dqt.quant.base import QUANTIZERS  # lazy: dqt.quant imports torch

        check(self.quantizer in QUANTIZERS, "search.quantizer",
              f"unknown quantizer '{self.quantizer}'; available: {', '.join(QUANTIZERS.names())}")
        check("bits" in QUANTIZERS.get(self.quantizer).arg_names(), "search.quantizer",
              f"{self.quantizer} takes no bits argument; the search varies bits")


@dataclass
class SearchBitsConfig:
    """``launch/search_bits.py``: a trained run's ``checkpoint`` (its directory or a
    ``checkpoints/step_*`` directory), the ``model`` and ``data`` it was trained with, and the
    ``search``; optim, steps, ... are used only to fine-tune (``search.finetune=true``)."""

    model: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    precision: Any = MISSING
    logger: Any = MISSING
    backend: Any = MISSING
    checkpoint: Optional[str] = None
    search: SearchConfig = field(default_factory=SearchConfig)
    seed: int = 0
    steps: int = 300
    grad_accum: int = 1
    eval_every: int = 100
    log_every: int = 10
    deterministic: bool = False

    def __post_init__(self) -> None:
        check(self.checkpoint is not None and self.checkpoint != "", "checkpoint",
              "required: the trained run to search, e.g. checkpoint=outputs/2026-11-26/12-00-00 "
              "(a run directory, or one of its checkpoints/step_* directories)")


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"mlp": MLPConfig, "cnn": CNNConfig, "resnet": ResNetConfig, "gpt": GPTConfig,
              "transformer": TransformerConfig},
    "data": {"digits": DigitsConfig, "synthetic": SyntheticConfig, "cifar10": CIFAR10Config,
             "mnist": MNISTConfig, "text": TextConfig, "shakespeare": ShakespeareConfig,
             "sort": SortConfig},
    "optim": {"optim": OptimConfig},
    "qat": {"qat": QATConfig},
    "precision": {"precision": PrecisionConfig},
    "logger": {"logger": LoggerConfig},
    "backend": {"backend": BackendConfig},
    "scheme": dict(SCHEME_CONFIGS),
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="search_bits_schema", node=SearchBitsConfig)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def to_typed(cfg: DictConfig) -> Any:
    """Composed DictConfig → validated :class:`TrainConfig` (or the schema it was composed
    with, e.g. :class:`SearchBitsConfig`); raises :class:`ConfigError`."""
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # omegaconf wraps errors raised in __post_init__
        cause = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    assert isinstance(obj, (TrainConfig, SearchBitsConfig))
    check_finite_floats(obj)  # inf/nan pass most range checks (inf > 0): refuse them all
    return obj

"""The trainer's typed configuration: :class:`TrainConfig` and the schemas of the trainer's own
groups (model, data, optim, precision, logger, backend, checkpoint, the bit-width search). The
components' configs are defined where the components live — ``scheme`` in
:mod:`dqt.comm.config`, ``qat`` in :mod:`dqt.quant.config` — and composed here; all are stored
in Hydra's ConfigStore by :func:`register_configs`.

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

from dqt.comm.config import SCHEME_CONFIGS
from dqt.errors import ConfigError, check
from dqt.errors import check_bool as _check_bool
from dqt.errors import check_choice as _choice
from dqt.quant.config import QATConfig

__all__ = ["ConfigError", "TrainConfig", "SearchBitsConfig", "register_configs", "to_typed"]


# --------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING


@dataclass
class MLPConfig(ModelConfig):
    """Fully connected net: input (flattened) → widths... → classes, ReLU between layers;
    ``batch_norm``: BatchNorm1d after each hidden Linear (before the ReLU)."""

    name: str = "mlp"
    widths: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check(len(self.widths) > 0 and all(w > 0 for w in self.widths), "model.widths",
              f"must be a non-empty list of positive ints; got {list(self.widths)}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")
        _check_bool(self.batch_norm, "model.batch_norm")


@dataclass
class CNNConfig(ModelConfig):
    """LeNet-style CNN: [conv5x5 → ReLU → maxpool2] per entry of ``channels``, then FC;
    ``batch_norm``: BatchNorm after each conv and the hidden Linear (before the ReLU)."""

    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    hidden: int = 128
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check(len(self.channels) > 0 and all(c > 0 for c in self.channels), "model.channels",
              f"must be a non-empty list of positive ints; got {list(self.channels)}")
        check(self.hidden > 0, "model.hidden", f"must be > 0; got {self.hidden}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")
        _check_bool(self.batch_norm, "model.batch_norm")


@dataclass
class ResNetConfig(ModelConfig):
    """CIFAR-style ResNet (He et al. 2016, §4.2): depth = 6n+2, widths 16/32/64 × ``width``/16."""

    name: str = "resnet20"
    depth: int = 20
    width: int = 16

    def __post_init__(self) -> None:
        check(self.depth >= 8 and (self.depth - 2) % 6 == 0, "model.depth",
              f"must be 6n+2 (20, 32, 44, 56, ...); got {self.depth}")
        check(self.width > 0, "model.width", f"must be > 0; got {self.width}")


@dataclass
class GPTConfig(ModelConfig):
    """Small GPT-style character transformer (pre-LN, causal self-attention, tied embeddings)."""

    name: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check(self.n_layer > 0, "model.n_layer", f"must be > 0; got {self.n_layer}")
        check(self.n_head > 0, "model.n_head", f"must be > 0; got {self.n_head}")
        check(self.n_embd > 0 and self.n_embd % max(self.n_head, 1) == 0, "model.n_embd",
              f"must be a positive multiple of model.n_head={self.n_head}; got {self.n_embd}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1); got {self.dropout}")


# --------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    batch_size: int = 64  # per rank, per micro-step
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "data.batch_size", f"must be > 0; got {self.batch_size}")
        check(self.eval_batch_size > 0, "data.eval_batch_size",
              f"must be > 0; got {self.eval_batch_size}")


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's 8×8 handwritten digits (1797 images, shipped inside the package)."""

    name: str = "digits"
    test_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.test_fraction < 1.0, "data.test_fraction",
              f"must be in (0, 1); got {self.test_fraction}")


@dataclass
class SyntheticConfig(DataConfig):
    """Seeded Gaussian-cluster classification data of any size (throughput runs)."""

    name: str = "synthetic"
    num_train: int = 8192
    num_test: int = 2048
    input_shape: list[int] = field(default_factory=lambda: [64])
    num_classes: int = 10
    noise: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_train > 0, "data.num_train", f"must be > 0; got {self.num_train}")
        check(self.num_test > 0, "data.num_test", f"must be > 0; got {self.num_test}")
        check(len(self.input_shape) > 0 and all(s > 0 for s in self.input_shape),
              "data.input_shape", f"must be positive ints; got {list(self.input_shape)}")
        check(self.num_classes >= 2, "data.num_classes", f"must be >= 2; got {self.num_classes}")
        check(self.noise >= 0, "data.noise", f"must be >= 0; got {self.noise}")


@dataclass
class FileDataConfig(DataConfig):
    """A dataset read from standard files under ``root`` (never downloaded at run time)."""

    root: str = MISSING


@dataclass
class CIFAR10Config(FileDataConfig):
    name: str = "cifar10"
    root: str = "data/cifar10"


@dataclass
class MNISTConfig(FileDataConfig):
    name: str = "mnist"
    root: str = "data/mnist"


@dataclass
class TextConfig(DataConfig):
    """Character-level corpus. ``path: null`` = the Python standard library's own sources."""

    name: str = "text"
    path: Optional[str] = None
    block_size: int = 64
    max_chars: int = 1_000_000
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.block_size > 1, "data.block_size", f"must be > 1; got {self.block_size}")
        check(self.max_chars > 10 * self.block_size, "data.max_chars",
              f"must be > 10 * data.block_size; got {self.max_chars}")
        check(0.0 < self.test_fraction < 1.0, "data.test_fraction",
              f"must be in (0, 1); got {self.test_fraction}")


@dataclass
class ShakespeareConfig(DataConfig):
    """Shakespeare's works, character level: 42 works from Project Gutenberg, cleaned and
    shipped inside the package (``dqt/train/corpora/shakespeare.txt.xz``, sha256-checked on
    load). The last 10 % of the characters are the validation split; training windows start
    at any offset; ``eval_windows``: the number of evenly spaced non-overlapping validation
    windows evaluated (0 = all of them, ~7,900 at ``block_size`` 64)."""

    name: str = "shakespeare"
    block_size: int = 64
    eval_windows: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.block_size > 1, "data.block_size", f"must be > 1; got {self.block_size}")
        check(self.eval_windows >= 0, "data.eval_windows",
              f"must be >= 0 (0 = every validation window); got {self.eval_windows}")


# language-model data: what model=gpt trains on
LM_DATA = ("text", "shakespeare")


# --------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    """Optimizer and LR schedule (linear warm-up, then ``schedule``)."""

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

    def __post_init__(self) -> None:
        _choice(self.name, ("sgd", "adamw", "adam"), "optim.name")
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

    def __post_init__(self) -> None:
        _choice(self.name, ("auto", "gloo", "nccl", "horovod"), "backend.name")
        check(self.timeout_s > 0, "backend.timeout_s", f"must be > 0; got {self.timeout_s}")


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
    init_from: Optional[str] = None  # weights of another run to start from (fine-tuning)

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
        lm_model = getattr(self.model, "name", None) == "gpt"
        lm_data = getattr(self.data, "name", None) in LM_DATA
        check(lm_model == lm_data, "model" if lm_data else "data",
              "model=gpt trains on data=text or data=shakespeare (language-model data) and the "
              "other models on classification data; "
              f"got model={getattr(self.model, 'name', '?')} data={getattr(self.data, 'name', '?')}")
        if getattr(self.backend, "name", None) == "horovod":
            self._check_horovod()

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
    "model": {"mlp": MLPConfig, "cnn": CNNConfig, "resnet": ResNetConfig, "gpt": GPTConfig},
    "data": {"digits": DigitsConfig, "synthetic": SyntheticConfig, "cifar10": CIFAR10Config,
             "mnist": MNISTConfig, "text": TextConfig, "shakespeare": ShakespeareConfig},
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
    return obj

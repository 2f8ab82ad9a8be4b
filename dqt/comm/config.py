"""The config of every gradient-communication scheme: one dataclass per ``+scheme=NAME``.

Each class is the schema of ``conf/scheme/NAME.yaml`` (stored in Hydra's ConfigStore as
``schema/scheme/NAME``) and the object a Python user passes to :func:`dqt.comm.build_scheme`.
Its defaults are the shipped preset's, its ``__post_init__`` is the only place its values are
checked (every error names ``scheme.<field>``), and a compressed scheme's config builds the
:class:`~dqt.kernels.blockq.BlockSpec` its kernels run (:meth:`CompressedConfig.block_spec`).
The class is the registry key of the scheme that runs it (:data:`dqt.comm.scheme.SCHEMES`).

Adding a codec of an existing block kind touches this file (a config class with its
``block_spec``, listed in :data:`SCHEME_CONFIGS`), ``conf/scheme/NAME.yaml`` and the case
table ``tests/cases.py`` (``docs/comm.md``); :mod:`dqt.comm.compressed_scheme` runs every
:class:`CompressedConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from omegaconf import MISSING

from dqt.errors import ConfigError, check, check_bool, check_choice
from dqt.kernels.blockq import BlockSpec

COLLECTIVES = ("two_phase", "allgather")
KERNELS = ("auto", "c", "triton", "reference")
SCALE_DTYPES = ("fp32", "bf16", "e8m0")
RECONSTRUCTIONS = ("symmetric", "two_means")
TERNARY_FORMATS = ("2bit", "base3")
FP8_FORMATS = ("e4m3", "e5m2")


@dataclass
class SchemeConfig:
    """A gradient-communication scheme, added with ``+scheme=NAME`` (absent: plain fp32
    all-reduce). Subclasses fix ``name`` to their option's name."""

    name: str = MISSING
    """The ``conf/scheme`` option; fixed by each subclass."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check(self.name == self.NAME, "scheme.name",
              f"{type(self).__name__} is the config of scheme '{self.NAME}'; got '{self.name}'")


# --------------------------------------------------------------------------- PyTorch's hooks
@dataclass
class FP16Config(SchemeConfig):
    """PyTorch's ``fp16_compress_hook``: cast to fp16, all-reduce, cast back (2 bytes/value)."""

    name: str = "fp16"
    NAME: ClassVar[str] = "fp16"


@dataclass
class BF16Config(SchemeConfig):
    """PyTorch's ``bf16_compress_hook``: the 16-bit baseline compression is measured against."""

    name: str = "bf16"
    NAME: ClassVar[str] = "bf16"


@dataclass
class PowerSGDConfig(SchemeConfig):
    """PyTorch's PowerSGD hook (Vogels et al., NeurIPS 2019); the fields are
    ``PowerSGDState``'s."""

    name: str = "powersgd"
    NAME: ClassVar[str] = "powersgd"
    matrix_approximation_rank: int = 1
    """Rank of the P·Qᵀ approximation of each gradient matrix."""
    start_powerSGD_iter: int = 10
    """Steps of plain all-reduce first (≥ 2 with error feedback)."""
    min_compression_rate: float = 2.0
    """Matrices compressed less than this go uncompressed."""
    use_error_feedback: bool = True
    warm_start: bool = True
    """Reuse Q from the previous step."""
    orthogonalization_epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.matrix_approximation_rank >= 1, "scheme.matrix_approximation_rank",
              f"must be >= 1; got {self.matrix_approximation_rank}")
        check(self.start_powerSGD_iter >= 2, "scheme.start_powerSGD_iter",
              f"must be >= 2 (PyTorch requires it with error feedback); got {self.start_powerSGD_iter}")
        check(self.min_compression_rate >= 0, "scheme.min_compression_rate",
              f"must be >= 0; got {self.min_compression_rate}")


# --------------------------------------------------------------------------- dqt's codecs
@dataclass
class CompressedConfig(SchemeConfig):
    """dqt's compressed all-reduce (:mod:`dqt.comm.compressed_scheme`): the knobs every codec
    shares. Subclasses add their codec's own fields and build its :class:`BlockSpec`."""

    block_size: int = 2048
    """The most values per scale, a multiple of 8; blocks never cross a parameter tensor."""
    error_feedback: bool = False
    """Worker and server residuals: what the codec drops is added to the next step's gradient."""
    warmup_steps: int = 0
    """Steps of plain fp32 all-reduce before compression starts."""
    min_bucket_numel: int = 1024
    """Buckets with fewer values go uncompressed."""
    collective: str = "two_phase"
    """``two_phase`` (all_to_all + all_gather, bandwidth-optimal) or ``allgather``."""
    seed: int = 0
    """The Philox key of stochastic rounding."""
    kernel: str = "auto"
    """``auto`` (C on CPU, Triton on CUDA), ``c``, ``triton`` or ``reference`` (pure torch)."""
    auto: bool = False
    """Time compressed vs plain all-reduce per bucket on the first compressed steps and keep
    the faster (the slowest rank decides; not bit-reproducible)."""
    auto_trials: int = 2
    """Compressed steps timed by ``auto``."""
    auto_margin: float = 1.0
    """``auto`` compresses when compressed time × auto_margin < plain time."""
    overlap: bool = True
    """Under DDP: encode each bucket on the autograd thread and run its collectives and
    decoding on a communication thread of the scheme's own, so the wire overlaps the rest of
    backward (:mod:`dqt.comm.overlap`). ``false``: the whole exchange inline in the hook."""

    biased: ClassVar[bool] = True
    """The codec's expectation differs from its input (wants error feedback)."""
    vote: ClassVar[bool] = False
    """Peers are combined by majority vote instead of the mean."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not isinstance(self.block_size, bool) and isinstance(self.block_size, int)
              and self.block_size >= 8 and self.block_size % 8 == 0, "scheme.block_size",
              f"must be a positive multiple of 8 (values per scale); got {self.block_size!r}")
        check_bool(self.error_feedback, "scheme.error_feedback")
        check(self.warmup_steps >= 0, "scheme.warmup_steps", f"must be >= 0; got {self.warmup_steps}")
        check(self.min_bucket_numel >= 0, "scheme.min_bucket_numel",
              f"must be >= 0; got {self.min_bucket_numel}")
        check_choice(self.collective, COLLECTIVES, "scheme.collective")
        check_choice(self.kernel, KERNELS, "scheme.kernel")
        check(self.auto_trials >= 1, "scheme.auto_trials", f"must be >= 1; got {self.auto_trials}")
        check(self.auto_margin > 0, "scheme.auto_margin", f"must be > 0; got {self.auto_margin}")
        check_bool(self.overlap, "scheme.overlap")

    def _check_no_error_feedback(self) -> None:
        """Stochastic codecs: E‖C(v) − v‖² = Σ|vᵢ|(s − |vᵢ|) exceeds ‖v‖² when one value sets the
        block's scale s far above the rest, so a residual fed back grows without bound."""
        check(not self.error_feedback, "scheme.error_feedback",
              f"{self.name} rounds stochastically and its error is not a contraction, so error "
              "feedback grows without bound (on the character GPT the average's error reached "
              "hundreds of times the gradient within 50 steps; docs/comm.md); it is unbiased "
              "without it")

    def block_spec(self) -> BlockSpec:  # pragma: no cover - abstract
        """The block format the kernels encode and decode."""
        raise NotImplementedError

    @property
    def stochastic(self) -> bool:
        return self.block_spec().stochastic


@dataclass
class OneBitConfig(CompressedConfig):
    """1-bit SGD (Seide, Fu, Droppo, Li, Yu, Interspeech 2014): sign × mean|x| per block, error
    feedback on worker and server. Blocks of 128 with a 1-byte power-of-two (e8m0) scale:
    1.0625 bits per value, 30.1× fewer bytes than fp32. The block size decides accuracy (digits,
    4 ranks: blocks of 64 +0.55 pt vs all-reduce, 256 −1.30 pt, 1024 −8.2 pt); a coarser scale
    costs little because error feedback absorbs its rounding. ``reconstruction=two_means`` is
    the paper's own decoder: the mean of the negative and of the non-negative values."""

    name: str = "onebit"
    NAME: ClassVar[str] = "onebit"
    block_size: int = 128
    error_feedback: bool = True
    scale_dtype: str = "e8m0"
    """The per-block scale on the wire: ``fp32``, ``bf16`` or ``e8m0`` (1 byte, a power of 2)."""
    reconstruction: str = "symmetric"
    """The values a block decodes to. ``symmetric``: ±a with a = mean|x| of the block, one
    scale (block kind ``sign_mean``). ``two_means``: Seide et al.'s two reconstruction values,
    the mean of the block's negative values and the mean of its non-negative ones, two scales
    per block (kind ``sign_two``; with e8m0, 1.125 instead of 1.0625 bits per value at 128)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.scale_dtype in SCALE_DTYPES, "scheme.scale_dtype",
              f"must be 'fp32', 'bf16' or 'e8m0'; got {self.scale_dtype!r}")
        check_choice(self.reconstruction, RECONSTRUCTIONS, "scheme.reconstruction")

    def block_spec(self) -> BlockSpec:
        kind = "sign_two" if self.reconstruction == "two_means" else "sign_mean"
        return BlockSpec(kind, self.block_size, 1, self.scale_dtype)


@dataclass
class EFSignSGDConfig(OneBitConfig):
    """EF-SignSGD (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019): ‖x‖₁/d · sign(x) per block
    of 2048 values of one tensor, fp32 scales, error feedback on worker and server
    (``reconstruction`` as for ``onebit``)."""

    name: str = "ef_signsgd"
    NAME: ClassVar[str] = "ef_signsgd"
    block_size: int = 2048
    scale_dtype: str = "fp32"


@dataclass
class SignSGDConfig(CompressedConfig):
    """signSGD with majority vote (Bernstein, Wang, Azizzadenesheli, Anandkumar, ICML 2018):
    1 bit per value, no scale; the average is sign(Σ signs), so pair it with a small
    ``optim.lr``. ``block_size`` only sets the kernels' block (there are no scales)."""

    name: str = "signsgd"
    NAME: ClassVar[str] = "signsgd"
    vote: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not self.error_feedback, "scheme.error_feedback",
              "signsgd is plain majority-vote signSGD; use scheme=ef_signsgd for error feedback")

    def block_spec(self) -> BlockSpec:
        return BlockSpec("sign", self.block_size, 1, "none")


@dataclass
class TernaryGradConfig(CompressedConfig):
    """TernGrad (Wen, Xu, Yan, Wu, Wang, Chen, Li, NeurIPS 2017): stochastic {−1, 0, +1} ×
    max|x| per block, unbiased without clipping; fp32 scale per block."""

    name: str = "ternary_grad"
    NAME: ClassVar[str] = "ternary_grad"
    format: str = "2bit"
    """``2bit`` (4 values per byte) or ``base3`` (5 per byte, 1.6 bits)."""
    clip_sigma: float = 0.0
    """> 0: clip at ±clip_sigma·σ before ternarizing (the paper uses 2.5; biased)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.format, TERNARY_FORMATS, "scheme.format")
        self._check_no_error_feedback()
        check(self.clip_sigma >= 0, "scheme.clip_sigma",
              f"must be >= 0 (0 = off); got {self.clip_sigma!r}")

    @property
    def biased(self) -> bool:  # type: ignore[override]
        return self.clip_sigma > 0

    def block_spec(self) -> BlockSpec:
        return BlockSpec("ternary", self.block_size, 2 if self.format == "2bit" else 0, "fp32",
                         clip=float(self.clip_sigma))


@dataclass
class QSGDConfig(CompressedConfig):
    """QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017): ν = ‖x‖₂ per block,
    level = stochastic rounding of |x|/ν·L with L = 2^(bits−1) − 1, code = 2·level + sign in
    ``bits`` bits. Unbiased."""

    name: str = "qsgd"
    NAME: ClassVar[str] = "qsgd"
    block_size: int = 128
    """QSGD's variance grows with the block (its bound is min(d/L², √d/L)): at 4 bits, blocks
    of 128 values trained the character GPT within noise of fp32 where blocks of 2048 were
    0.07 nats worse (docs/comm.md); the fp32 scale costs 0.25 bits per value."""
    bits: int = 4
    """Bits per value: a sign and bits−1 for the level, 2..8."""

    biased: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check(not isinstance(self.bits, bool) and isinstance(self.bits, int)
              and 2 <= self.bits <= 8, "scheme.bits", f"must be in [2, 8]; got {self.bits!r}")
        self._check_no_error_feedback()

    def block_spec(self) -> BlockSpec:
        return BlockSpec("qsgd", self.block_size, self.bits, "fp32",
                         levels=(1 << (self.bits - 1)) - 1)


@dataclass
class FP8Config(CompressedConfig):
    """8-bit floating point per value with one scale per block: s = the smallest power of two
    with max|x| ≤ FMAX·s (the OCP Microscaling shared exponent, rounded up so nothing
    saturates), code = the fp8 value of x / s, rounded to nearest even (block kinds
    ``fp8_e4m3`` / ``fp8_e5m2``). Deterministic; no error feedback by
    default (as torchft's fp8 quantized all-reduce): the rounding error is at most half an fp8
    step, 2⁻⁴ (e4m3) or 2⁻³ (e5m2) of a normal value, and error feedback would cost a worker
    and a server residual (8 bytes per parameter); ``error_feedback=true`` adds them."""

    name: str = "fp8"
    NAME: ClassVar[str] = "fp8"
    block_size: int = 128
    """Values per scale: 128 with an e8m0 scale is 1.008 bytes per value (3.97× fewer than
    fp32)."""
    format: str = "e4m3"
    """``e4m3`` (OCP float8_e4m3fn: 3 mantissa bits, max 448, no inf) or ``e5m2``
    (float8_e5m2: 2 mantissa bits, max 57344): precision against range."""
    scale_dtype: str = "e8m0"
    """The per-block scale on the wire: ``e8m0`` (1 byte), ``bf16`` (2) or ``fp32`` (4). The
    scale is a power of two, so every format carries it exactly: the choice changes bytes, not
    values."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.format, FP8_FORMATS, "scheme.format")
        check(self.scale_dtype in SCALE_DTYPES, "scheme.scale_dtype",
              f"must be 'fp32', 'bf16' or 'e8m0'; got {self.scale_dtype!r}")

    def block_spec(self) -> BlockSpec:
        return BlockSpec(f"fp8_{self.format}", self.block_size, 8, self.scale_dtype)


SCHEME_CONFIGS: dict[str, type[SchemeConfig]] = {
    c.NAME: c for c in (FP16Config, BF16Config, PowerSGDConfig, OneBitConfig, EFSignSGDConfig,
                        SignSGDConfig, TernaryGradConfig, QSGDConfig, FP8Config)}
"""``+scheme=NAME`` → its config class (the schemas Hydra stores under ``schema/scheme``)."""


def compressed_config(name: str, **options: Any) -> CompressedConfig:
    """The config of dqt codec ``name`` with ``options``; an unknown name is a KeyError, an
    option the codec does not take a :class:`ConfigError` naming ``scheme.<option>`` and
    listing the accepted ones."""
    cls = SCHEME_CONFIGS.get(name)
    if cls is None or not issubclass(cls, CompressedConfig):
        codecs = sorted(n for n, c in SCHEME_CONFIGS.items() if issubclass(c, CompressedConfig))
        raise KeyError(f"scheme.name: unknown compressor '{name}'; available: {', '.join(codecs)}")
    accepted = [f.name for f in fields(cls) if f.name != "name"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"scheme.{unknown[0]}", f"not an option of compressor '{name}'; "
                          f"accepted: {', '.join(accepted)}")
    return cls(**options)  # type: ignore[return-value]

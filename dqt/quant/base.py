"""The quantizer base class and the registry that names every quantizer.

A :class:`Quantizer` is an ``nn.Module`` that fake-quantizes one tensor of a layer:

* ``kind="weight"``: registered as a parametrization of the layer's ``weight``;
* ``kind="act"``: applied to the layer's input by a forward pre-hook;
* ``kind="grad"``: identity in the forward pass; in the backward pass it quantizes the gradient
  flowing into the layer's *output* (DoReFa's ``fg``), attached by a forward hook.

The maths always runs in fp32 with autocast disabled and the result is cast back to the input
dtype, so QAT works under ``precision=bf16|fp16`` (the complaint of pytorch#42351/#94371).

Parameters a quantizer owns itself (TTQ's W_p/W_n, LSQ's step s, PACT's clip α) are
*quantizer parameters*: :func:`quantizer_parameters` lists them (ownership is the marker — every
parameter registered on a :class:`Quantizer` module, never the layer's own weight, which lives on
the parametrization list), so an optimizer can give them their own learning rate and weight
decay (``qat.quantizer_lr_mult``, ``qat.quantizer_weight_decay``).

A quantizer's arguments are the fields of its nested ``Config`` dataclass (one field per
argument, with its default and a docstring), which also validates them: ``__post_init__`` checks
the ranges and ``check_kind`` what depends on the tensor kind, both raising :class:`ArgError`.
A quantizer is built as ``cls(kind, cls.Config(bits=4))`` or, equivalently, ``cls(kind, bits=4)``;
the ``qat`` config's slot type (``dqt.quant.config.QuantizerConfig``) is generated from the
``Config`` fields of every registered quantizer.

State that must survive a checkpoint lives in buffers or parameters. State computed from
per-rank data (EMA ranges, Autoflex maxima, LSQ's first-batch init) is never written in
``forward``: the quantizer records ``stats()`` and :func:`dqt.quant.prepare.qat_step` all-reduces
them (MAX) over the ranks once per optimizer step and calls ``commit`` with the result, so the
state is identical on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from dqt.registry import Registry

log = logging.getLogger("dqt")

QUANTIZERS: Registry[type["Quantizer"]] = Registry("quantizer name")
KINDS = ("weight", "act", "grad")


class ArgError(ValueError):
    """A bad quantizer argument; ``field`` is the argument name (``bits``), or "" for the spec."""

    def __init__(self, field: str, msg: str) -> None:
        self.field, self.msg = field, msg
        super().__init__(f"{field}: {msg}" if field else msg)


def need(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ArgError(field, msg)


class Quantizer(nn.Module):
    """Base class. Subclasses set ``name`` (registry key), ``kinds``, nest their arguments'
    ``Config`` (a subclass of ``Quantizer.Config``) and implement :meth:`quantize` (fp32 in →
    fp32 out, with its straight-through estimator)."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ("weight", "act")
    stateful: ClassVar[bool] = False  # True: implements stats() / commit()
    reduce: ClassVar[str] = "max"  # how qat_step combines the ranks' stats(): "max" or "sum"
    #: arguments that describe() and repr() leave out while they have this value
    quiet: ClassVar[dict[str, Any]] = {}

    @dataclass
    class Config:
        """A quantizer's arguments: subclasses add one field per argument (its default, and a
        docstring under it) and check ranges in ``__post_init__``. This base takes none."""

        def check_kind(self, kind: str) -> None:
            """Raise :class:`ArgError` for an argument that ``kind`` ("weight", "act", "grad")
            cannot take (``per_channel`` activations, ...); the ranges are checked already."""

        def check_weight(self, shape: tuple[int, ...]) -> None:
            """Raise :class:`ArgError` for an argument that a weight of ``shape`` cannot take
            (a ``group_size`` that does not divide its rows); ``prepare`` calls it for every
            weight before attaching anything."""

    def __init__(self, kind: str, cfg: Optional[Config] = None, **args: Any) -> None:
        """``cfg``: the arguments, or None to build ``Config(**args)`` (which checks them)."""
        super().__init__()
        if cfg is None:
            cfg = type(self).Config(**args)
        elif args or not isinstance(cfg, type(self).Config):
            raise TypeError(f"{self.name}: takes a {type(self).__qualname__}.Config or keyword "
                            f"arguments (one of the two); got {cfg!r} and {args}")
        self.kind = kind
        self.cfg = cfg
        self.layer: Optional[nn.Module] = None  # set by prepare (not a submodule)

    # ---------------------------------------------------------------- arguments
    @classmethod
    def arg_names(cls) -> list[str]:
        """The argument names, in the order of the ``Config`` fields."""
        return [f.name for f in dataclasses.fields(cls.Config)]

    def _shown_args(self) -> list[str]:
        return [k for k in self.arg_names() if hasattr(self, k)
                and not (k in self.quiet and getattr(self, k) == self.quiet[k])]

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._shown_args())
        return f"{self.kind}, {args}" if args else self.kind

    def describe(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)}" for k in self._shown_args())
        return f"{self.name}({args})"

    # ---------------------------------------------------------------- the maths
    def quantize(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "grad":
            return _QuantizeGrad.apply(x, self)
        if not x.is_floating_point():
            return x
        if self.kind == "act" and not self.__dict__.get("_sign_checked", False):
            self._check_sign(x)
        with torch.autocast(x.device.type, enabled=False):
            y = self.quantize(x.float())
        return y.to(x.dtype)

    def unsigned_range(self) -> Optional[str]:
        """Activation quantizers whose levels are all ≥ 0 (DoReFa's [0, 1], PACT's [0, α],
        HWGQ, LSQ's activations) return that range, e.g. "[0, 1]"; signed ones None."""
        return None

    def _check_sign(self, x: Tensor) -> None:
        """Once, on the first input: warn when an unsigned activation quantizer gets negative
        values (after a LayerNorm, a GELU, a residual stream), which it clips to 0."""
        self.__dict__["_sign_checked"] = True
        rng = self.unsigned_range()
        if rng is None:
            return
        lo = float(x.detach().amin()) if x.numel() else 0.0
        if lo < 0:
            where = self.__dict__.get("layer_name") or type(self.layer).__name__
            log.warning("qat: %s on %s quantizes its input to %s, but the input has negative "
                        "values (min %.3g; after a LayerNorm, a GELU or a residual, inputs are "
                        "signed): they are clipped to 0. A signed activation quantizer (int, "
                        "uint, ...) or a rule without act for this layer keeps them",
                        self.describe(), where, rng, lo)

    # ---------------------------------------------------------------- export / summary
    def storage_bits(self) -> Optional[float]:
        """Bits per weight in the export (None: not exportable as codes)."""
        return getattr(self, "bits", None)

    def encode(self, w: Tensor) -> Any:
        """Weight → codes (a ``dqt.quant.export.codes`` format) whose decode equals ``quantize(w)``
        bit for bit. Weight quantizers implement it."""
        raise NotImplementedError(f"{self.name} does not export weights")

    # ---------------------------------------------------------------- cross-rank state
    def stats(self) -> Optional[Tensor]:
        """Statistics recorded since the last commit (fixed size; −inf where nothing was
        recorded); reduced over ranks (``reduce``: MAX, or SUM for accumulated sums such as
        BWNH's XXᵀ) before :meth:`commit`."""
        return None

    def commit(self, stats: Tensor) -> None:
        """Update the state from the rank-reduced statistics (identical on every rank)."""

    def assumes_batch_norm(self) -> Optional[str]:
        """Weight quantizers whose paper puts a BatchNorm after the layer (unscaled ±1 or [−1, 1]
        weights) return why, and ``prepare`` warns when no BN follows the layer; else None."""
        return None

    def after_step(self, weight: Optional[Tensor]) -> None:
        """Called after every optimizer step with the layer's real weight (BNN clipping)."""

    def add_penalty_grad(self, weight: Tensor) -> None:
        """Called before every optimizer step, after the gradients are all-reduced and unscaled,
        with the layer's real weight: add the gradient of a penalty the method puts on the
        weight to ``weight.grad`` (ADMM's ρ(W − G + λ)). Must depend only on state that is
        identical on every rank."""

    @property
    def recording(self) -> bool:
        return self.training and torch.is_grad_enabled()

    # ---------------------------------------------------------------- attaching
    def bind(self, layer: nn.Module) -> None:
        """Remember the layer (not as a submodule: no cycle in ``named_modules``)."""
        self.__dict__["layer"] = layer

    def init_from(self, weight: Tensor) -> None:
        """Weight quantizers: initialise learned parameters from the (initial) weight."""


class _QuantizeGrad(torch.autograd.Function):
    """Identity forward; the backward pass quantizes the incoming gradient with ``q.quantize``
    (fp32, autocast off). Non-finite gradients stay non-finite so GradScaler still skips."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, q: Quantizer) -> Tensor:
        ctx.q = q
        return x.clone()  # a fresh tensor: the next layer may modify it in place (ReLU)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        with torch.autocast(g.device.type, enabled=False):
            out = ctx.q.quantize(g.float())
        out = torch.where(torch.isfinite(g), out.to(g.dtype), g)
        return out, None


def quantizer_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter owned by a :class:`Quantizer` of ``model`` (TTQ
    ``w_p``/``w_n``, LSQ ``s``, PACT ``alpha``), in ``named_parameters`` order, each once."""
    owned = {id(p) for m in model.modules() if isinstance(m, Quantizer)
             for p in m.parameters(recurse=False)}
    return [(n, p) for n, p in model.named_parameters() if id(p) in owned]


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: add a quantizer to :data:`QUANTIZERS` under ``cls.name``."""
    assert cls.name, cls
    QUANTIZERS.register(cls.name)(cls)
    return cls


def per_channel_dims(x: Tensor) -> tuple[int, ...]:
    """Every dim but the first (output channels of Linear/Conv, rows of Embedding)."""
    return tuple(range(1, x.dim()))


def amax(x: Tensor, per_channel: bool) -> Tensor:
    """max|x| over the tensor, or per output channel (keepdim, broadcastable to x)."""
    if per_channel and x.dim() > 1:
        return x.abs().amax(dim=per_channel_dims(x), keepdim=True)
    return x.abs().amax()


def to_rows(t: Tensor, w: Tensor) -> Tensor:
    """A per-tensor or per-channel (keepdim) quantity → one fp32 value per output row (N,)."""
    return t.detach().float().reshape(-1).expand(w.shape[0]).clone() if t.numel() == 1 \
        else t.detach().float().reshape(w.shape[0])

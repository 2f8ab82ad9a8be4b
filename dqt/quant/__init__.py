"""Quantization-aware training (the model side of dqt).

``qat = quantize_(model, cfg.qat)`` attaches the quantizers that the ``qat`` config assigns to
each layer (``dqt.quant.rules``, ``dqt.quant.prepare``) in place and returns the :class:`QAT`
handle the training loop drives: ``qat.before_step()`` / ``qat.after_step()`` around the
optimizer step, ``qat.param_groups(lr)`` for the optimizer, ``qat.summary()`` for the packed
size. ``qat: none`` (no quantizer anywhere) leaves the model untouched and the handle inactive.

Layout: the framework here (``base``: the :class:`Quantizer` base and the :data:`QUANTIZERS`
registry; ``ste``, ``observers``, ``input_stats``; ``rules``, ``prepare``, ``bn_fold``;
``config``: the ``qat`` schema; ``search``: the bit-width rule), the quantization methods in
``dqt.quant.methods`` (one module per family, each quantizer with its ``Config`` dataclass of
arguments), the export in ``dqt.quant.export`` (codes, convert, summary, serialize, packed
GEMM). The quantizers, by method module (``dqt.quant.methods.<module>``):

=================  ============================================================  ===========
method module      quantizers                                                     kinds
=================  ============================================================  ===========
``integer``        ``int`` (symmetric INT-k), ``uint`` (affine r = S(q − Z))      weight, act
``fixed_point``    ``linear`` (the seed's), ``dynamic_fixed``, ``qnn_linear``     weight, act
``minifloat``      ``minifloat`` (exp/mantissa bits)                              weight, act
``learned``        ``lsq`` (weight, act), ``pact`` (act)
``log_quant``      ``log_linear`` (the seed's), ``ap2``, ``log2`` (weight, act), ``pow2`` (weight)
``tanh_quant``     ``tanh`` (the seed's)                                          weight, act
``dorefa``         ``dorefa_w``, ``dorefa_a``, ``dorefa_g``                       w / a / grad
``binary``         ``bnn_sign``, ``binary_connect``, ``bwn``, ``xnor``, ``horq``
``ternary``        ``twn``, ``ttq``                                               weight
``flexpoint``      ``flex`` (flex16+5 with Autoflex)                              w / a / grad
``admm``           ``admm`` (Leng et al.: {±a}, {0, ±a}, {0, ±a, ±2a, ±4a} by ADMM) weight
``balanced``       ``balanced`` (Zhou et al.: recursive-percentile bins, uniform)  weight
``hwgq``           ``hwgq`` (Cai et al.: half-wave Gaussian Lloyd levels)          act
``alternating``    ``aqn`` (Xu et al.: w ≈ Σ αᵢbᵢ by alternating least squares)    weight
``product``        ``pq`` (Q-CNN product quantization, k-means, error correction)  weight
``hashing``        ``bwnh`` (BWNH: binary weights by inner-product hashing)       weight
``factorized``     ``ffn`` (FFN: W ≈ X·D·Yᵀ, ternary X, Y by SDD)                 weight
``tnn``            ``tnn_a`` (TNN ternary activations; weights: ``twn``)          act
``wage``           ``wage_w``, ``wage_a``, ``wage_e`` (WAGE; W carries Q_G)       w / a / grad
``weight_sharing`` ``kmeans`` (Deep Compression: shared centroids)               weight
``inq``            ``inq`` (incremental power-of-two quantization, staged)       weight
``shiftcnn``       ``shiftcnn`` (sum of N power-of-two codewords)                weight
=================  ============================================================  ===========

``dqt.quant`` never imports ``dqt.train`` or ``dqt.comm``; it imports ``dqt.kernels`` for the
packed weight layout.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from dqt.quant import methods  # noqa: F401  (registers every quantizer)
from dqt.quant.base import QUANTIZERS, Quantizer, quantizer_parameters
from dqt.quant.export.summary import format_summary, summarize
from dqt.quant.prepare import prepare, qat_penalty, qat_step
from dqt.quant.config import QATConfig, QATRuleConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant.export.convert import convert, load_packed
from dqt.quant.export.serialize import read_export, save_export
from dqt.quant.presets import preset, presets
from dqt.quant.rules import LayerPlan

__all__ = ["QAT", "QATConfig", "QATRuleConfig", "QATSlotsConfig", "QUANTIZERS", "Quantizer",
           "QuantizerConfig", "apply_qat", "convert", "is_active", "load_packed", "prepare",
           "preset", "presets", "qat_penalty", "qat_step", "quantize_", "quantizer_parameters",
           "read_export", "save_export"]


def is_active(cfg: Any) -> bool:
    """Does this ``qat`` config attach anything (or change the model)?"""
    slots = (cfg.default.weight, cfg.default.act, cfg.default.grad)
    return bool(cfg.rules) or any(s is not None for s in slots) or bool(cfg.replace_relu)


def apply_qat(cfg: Any, model: nn.Module) -> nn.Module:
    """Attach ``cfg``'s quantizers to ``model`` in place (before DDP wraps it); returns it."""
    return quantize_(model, cfg).model


def quantize_(model: nn.Module, cfg: Any) -> QAT:
    """Quantization-aware training for ``model``, in place: attach the quantizers that ``cfg``
    (a ``QATConfig``, the ``qat`` config group) assigns to its layers and return the
    :class:`QAT` handle that the training loop drives.

    Call it on the bare model, before DDP (or Horovod) wraps it and before the optimizer is
    built (the quantizers own parameters: TTQ's W_p/W_n, LSQ's s, PACT's α). The quantizers are
    submodules of their layers, so ``model.state_dict()`` and checkpoints carry their state.
    With ``qat: none`` nothing is attached and the handle is inactive (its calls do nothing).

    Example::

        qat = quantize_(model, cfg.qat)
        opt = torch.optim.SGD(qat.param_groups(lr=0.1), lr=0.1)
        for x, y in batches:
            loss_fn(model(x), y).backward()
            qat.before_step()
            opt.step()
            qat.after_step()
            opt.zero_grad()
        print(qat.format_summary())
    """
    if is_active(cfg):
        prepare(model, cfg)
    return QAT(model, cfg)


class QAT:
    """The handle on a model's quantization-aware training (what :func:`quantize_` returns).

    ``QAT(model, cfg)`` is the handle of a ``model`` that ``cfg`` prepared already (or of a
    plain model: ``cfg`` None); it holds no state of its own — the quantizers' state lives in
    the model. Every rank calls, around each optimizer step:

    * :meth:`before_step` — after the backward pass, once the gradients are all-reduced and
      unscaled, before gradient clipping and ``optimizer.step()``: adds the penalty gradients
      some methods put on the weights (ADMM's ρ(W − G + λ));
    * :meth:`after_step` — after ``optimizer.step()``: all-reduces the statistics the stateful
      quantizers recorded (EMA ranges, Autoflex maxima, LSQ's first-batch step, input
      covariances; a collective, so every rank must call it) and commits them, so the
      quantizer state is identical on every rank; then applies the per-step weight constraints
      and schedules (BNN/BinaryConnect and WAGE clipping, ADMM's G/λ, k-means and INQ stages).

    The optimizer takes :meth:`param_groups` (the quantizers' own parameters, :meth:`parameters`,
    in a group with ``qat.quantizer_lr_mult`` and ``qat.quantizer_weight_decay``); at the end,
    :meth:`summary` / :meth:`format_summary` give the packed size of the model.
    """

    def __init__(self, model: nn.Module, cfg: Any = None) -> None:
        self.model = model
        self.cfg = cfg
        #: False for ``qat: none`` (or no config): before_step/after_step do nothing.
        self.active = cfg is not None and is_active(cfg)

    def __repr__(self) -> str:
        name = getattr(self.cfg, "name", None)
        return f"QAT(qat={name!r}, active={self.active}, layers={len(self.plan)})"

    @property
    def plan(self) -> list[LayerPlan]:
        """The per-layer plan (layer, its quantizers' specs, which rule chose them) that
        ``prepare`` attached; empty when inactive."""
        return self.model.__dict__.get("_dqt_plan", [])

    # ------------------------------------------------------------------ the training step
    def before_step(self) -> None:
        """Before ``optimizer.step()``, on the all-reduced and unscaled gradients: add the
        quantizers' penalty gradients (``Quantizer.add_penalty_grad``)."""
        if self.active:
            qat_penalty(self.model)

    def after_step(self) -> None:
        """After ``optimizer.step()``: sync and commit the quantizers' statistics over the
        ranks (a collective: call it on every rank) and apply their per-step constraints
        (``Quantizer.commit``, ``Quantizer.after_step``)."""
        if self.active:
            qat_step(self.model)

    # ------------------------------------------------------------------ the optimizer
    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every parameter a quantizer owns (TTQ ``w_p``/``w_n``, LSQ
        ``s``, PACT ``alpha``, k-means centroids), in ``named_parameters`` order."""
        return quantizer_parameters(self.model)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer's param groups: ``model`` (every trainable parameter but the
        quantizers', at the optimizer's own lr and weight decay) and, when the model has
        quantizer parameters, ``quantizer`` with lr = ``lr × qat.quantizer_lr_mult`` and weight
        decay ``qat.quantizer_weight_decay`` (1 and 0 without a config).

        Why a group of their own: a quantizer parameter's gradient is a *sum* over a whole
        tensor (TTQ: ∂L/∂W_p = Σ_{i∈I_p} ∂L/∂w_t(i), Zhu et al. 2017), so at the weights'
        learning rate one step moves it by orders of magnitude more than any weight; TTQ trains
        W_p/W_n with their own Adam, and Brevitas/LSQ users put scales in a separate group
        without weight decay."""
        mult = self.cfg.quantizer_lr_mult if self.cfg is not None else 1.0
        decay = self.cfg.quantizer_weight_decay if self.cfg is not None else 0.0
        quant = {id(p) for _, p in self.parameters() if p.requires_grad}
        params = list(self.model.parameters())
        main = [p for p in params if p.requires_grad and id(p) not in quant]
        groups: list[dict[str, Any]] = [{"name": "model", "params": main}]
        if quant:
            groups.append({"name": "quantizer", "lr": lr * mult, "weight_decay": decay,
                           "params": [p for p in params if id(p) in quant]})
        return groups

    # ------------------------------------------------------------------ size
    def summary(self) -> dict[str, Any]:
        """The packed size of the model as exported (``dqt.quant.export.summary.summarize``):
        per-layer rows, parameters per bit-width, packed and fp32 bytes, compression."""
        return summarize(self.model)

    def format_summary(self, summary: Optional[dict[str, Any]] = None) -> str:
        """:meth:`summary` (or the one given) as a Markdown table and two lines of totals."""
        return format_summary(summary if summary is not None else self.summary())

"""Quantization-aware training (the model side of dqt).

``apply_qat(cfg.qat, model)`` attaches the quantizers that the ``qat`` config assigns to each
layer (``dqt.quant.rules``, ``dqt.quant.prepare``); ``qat: none`` (no quantizer anywhere) leaves
the model untouched. The quantizers themselves are registered by name in :data:`QUANTIZERS`:

=================  ============================================================  ===========
module             quantizers                                                     kinds
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

from typing import Any

from torch import nn

from dqt.quant import (admm, alternating, balanced, binary, dorefa,  # noqa: F401
                       fixed_point, flexpoint, hwgq, integer, learned, log_quant, minifloat,
                       tanh_quant, ternary)
from dqt.quant import factorized, hashing, product, tnn, wage  # noqa: F401
from dqt.quant import inq, shiftcnn, weight_sharing  # noqa: F401
from dqt.quant.base import QUANTIZERS, Quantizer, quantizer_parameters
from dqt.quant.prepare import prepare, qat_penalty, qat_step

__all__ = ["QUANTIZERS", "Quantizer", "apply_qat", "is_active", "prepare", "qat_penalty",
           "qat_step", "quantizer_parameters"]


def is_active(cfg: Any) -> bool:
    """Does this ``qat`` config attach anything (or change the model)?"""
    slots = (cfg.default.weight, cfg.default.act, cfg.default.grad)
    return bool(cfg.rules) or any(s is not None for s in slots) or bool(cfg.replace_relu)


def apply_qat(cfg: Any, model: nn.Module) -> nn.Module:
    """Attach ``cfg``'s quantizers to ``model`` in place (before DDP wraps it)."""
    return prepare(model, cfg) if is_active(cfg) else model

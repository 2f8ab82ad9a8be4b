"""The quantizer arguments: each quantizer's own ``Config`` dataclass is the one place they are
defined and checked; the ``qat`` slot type ``QuantizerConfig`` is generated from them. And the
``QAT`` handle that ``quantize_`` returns."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

import pytest
import torch
from torch import nn

from dqt.quant import QAT, QUANTIZERS, Quantizer, quantize_
from dqt.quant.base import ArgError
from dqt.quant.config import (QATConfig, QATSlotsConfig, QuantizerConfig, method_config,
                              slot_config_class)


def _quantizer(name: str, **fields: Any) -> type[Quantizer]:
    """An unregistered quantizer class whose Config has ``fields`` (name -> (type, default))."""
    cfg = dataclasses.make_dataclass(
        "Config", [(k, t, dataclasses.field(default=d)) for k, (t, d) in fields.items()],
        bases=(Quantizer.Config,))
    return type(name, (Quantizer,), {"name": name, "Config": cfg})


def test_slot_is_name_plus_the_union_of_every_config_field():
    union = {f.name for n in QUANTIZERS.names()
             for f in dataclasses.fields(QUANTIZERS.get(n).Config)}
    slot = dataclasses.fields(QuantizerConfig)
    assert slot[0].name == "name" and {f.name for f in slot[1:]} == union
    hints = typing.get_type_hints(QuantizerConfig)
    for f in slot[1:]:
        assert f.default is None and type(None) in typing.get_args(hints[f.name]), f.name


def test_same_field_with_another_type_is_an_error():
    """``dqt.quant.config`` builds ``QuantizerConfig`` with ``slot_config_class`` when imported,
    so a registered method that redeclares an argument with another type fails that import."""
    a = _quantizer("qa", bits=(int, 4), init=(Optional[float], None))
    b = _quantizer("qb", bits=(Optional[int], None), init=(float, 1.0))  # Optional[T] is T
    names = [f.name for f in dataclasses.fields(slot_config_class([a, b]))]
    assert names == ["name", "bits", "init"]
    c = _quantizer("qc", bits=(float, 4.0))
    with pytest.raises(TypeError, match="'bits' is <class 'int'> in qa, qb but <class 'float'> "
                                        "in qc"):
        slot_config_class([a, b, c])


def test_arguments_are_checked_by_the_config_and_named_in_order():
    assert QUANTIZERS.get("twn").arg_names() == ["threshold", "per_channel"]
    assert QUANTIZERS.get("bwn").arg_names() == []
    with pytest.raises(ArgError) as e:
        QUANTIZERS.get("lsq").Config(bits=9)
    assert (e.value.field, e.value.msg) == ("bits", "must be in [2, 8]; got 9")
    with pytest.raises(ArgError) as e:
        QUANTIZERS.get("int").Config(per_channel=True).check_kind("act")
    assert e.value.msg == "activations are quantized per tensor"
    cls, cfg = method_config(QuantizerConfig(name="int", bits=4), "weight", "qat.default.weight")
    assert cfg == cls.Config(bits=4) and cls(kind="weight", cfg=cfg).per_channel
    q = cls("weight", bits=4)
    assert q.cfg == cfg and q.describe() == "int(bits=4, per_channel=True, momentum=0.1)"
    with pytest.raises(TypeError):
        cls("weight", cfg, bits=4)


def test_quantize_returns_the_handle_the_training_loop_drives():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    off = quantize_(net, QATConfig())
    assert not off.active and off.plan == [] and not off.parameters()
    off.before_step(), off.after_step()  # no-ops
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="ttq"),
                                                     act=QuantizerConfig(name="int", bits=8)),
                    keep_first_last=False, quantizer_lr_mult=0.5, quantizer_weight_decay=0.1)
    qat = quantize_(net, cfg)
    assert isinstance(qat, QAT) and qat.active and qat.model is net and len(qat.plan) == 2
    assert [n for n, _ in qat.parameters()] == [
        "0.parametrizations.weight.0.w_p", "0.parametrizations.weight.0.w_n",
        "2.parametrizations.weight.0.w_p", "2.parametrizations.weight.0.w_n"]
    model_g, quant_g = qat.param_groups(lr=0.2)
    assert quant_g["lr"] == 0.1 and quant_g["weight_decay"] == 0.1 and len(quant_g["params"]) == 4
    assert len(model_g["params"]) == 4  # two weights, two biases
    opt = torch.optim.SGD(qat.param_groups(lr=0.2), lr=0.2)
    net(torch.randn(5, 4)).sum().backward()
    qat.before_step()
    opt.step()
    qat.after_step()  # commits the act quantizers' EMA range
    assert bool(net[0].input_quantizer.observer.initialized)
    s = qat.summary()
    assert s["packed_bytes"] < s["fp32_bytes"] and "| 0 | ttq(" in qat.format_summary(s)


def test_help_explains_the_handle():
    assert "before DDP" in quantize_.__doc__ and "qat.before_step()" in quantize_.__doc__
    for m in ("before_step", "after_step", "parameters", "param_groups", "summary"):
        assert getattr(QAT, m).__doc__, m

"""Convert a fake-quant model to packed integer weights, and install packed weights back.

``convert(model)`` walks the layers whose weight carries a quantizer and asks the quantizer to
``encode`` the weight it sees (after BN folding, if any) into one of the formats of
:mod:`dqt.quant.export.codes` — for affine codes exactly the packed-GEMM layout of
``dqt.kernels.lowbit_pack`` (``W[n,k] = scale[n]·(code[n,k] − zero[n])``, codes packed along K
into int32). Every other entry of the state dict (biases, BatchNorm, fp32 layers, activation
quantizer state) is kept as it is; a weight quantizer's own state (LSQ's s, ADMM's λ and G) is
not: the codes replace it. :mod:`dqt.quant.export.serialize` writes the result to disk.

``load_packed(model, tensors, doc)`` takes a model *prepared with the same qat config* and swaps
each weight quantizer for a :class:`PackedWeight` that dequantizes the stored codes at every
forward (the reference inference path: dequantize, then the layer's own matmul/conv). Because
every quantizer computes its forward value with the same fp32 operations as the decoder, the
outputs equal the fake-quant model's bit for bit (``tests/test_quant_export.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dqt.quant.bn_fold import FoldScale, folded_bias
from dqt.quant.export.codes import FORMATS
from dqt.quant.prepare import weight_quantizer, weight_quantizers


def _quantizer_input(m: nn.Module, wname: str = "weight") -> tuple[Tensor, int]:
    """The tensor the weight quantizer sees (after FoldScale) and its index in the chain."""
    plist = m.parametrizations[wname]
    x = plist.original
    for i, p in enumerate(plist):
        if p is weight_quantizer(m, wname):
            return x, i
        x = p(x)
    raise AssertionError("weight quantizer not found")


def _entry(name: str, wname: str) -> str:
    """The export's name of a quantized tensor: the layer's (``weight``), else layer.tensor
    (an attention's ``in_proj_weight``); its codes are ``<layer>.<tensor>.<key>``."""
    return name if wname == "weight" else f"{name}.{wname}"


@torch.no_grad()
def convert(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, per-layer metadata) of the export; does not modify ``model``."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    skip: set[str] = set()
    for name, m in model.named_modules():
        for wname, q in weight_quantizers(m).items():
            w, idx = _quantizer_input(m, wname)
            was = q.training
            q.eval()
            codes = q.encode(w.detach().float())
            q.train(was)
            for key, t in codes.tensors().items():
                tensors[f"{name}.{wname}.{key}"] = t
            meta = {"quantizer": q.name, "describe": q.describe(), "format": codes.format,
                    "shape": list(w.shape), "n": int(w.shape[0]), "k": int(w[0].numel()),
                    **codes.meta()}
            if wname != "weight":
                meta["module"], meta["tensor"] = name, wname
            fold = m.parametrizations[wname][0]
            if isinstance(fold, FoldScale):
                bn_name = next(n for n, mod in model.named_modules() if mod is fold.bn)
                meta["bn_folded"] = bn_name
                tensors[f"{name}.bias_folded"] = folded_bias(m, fold.bn).float()
            layers[_entry(name, wname)] = meta
            skip.add(f"{name}.parametrizations.{wname}.original")
            # the quantizer's own state (LSQ s, ADMM λ and G): the codes replace it
            own = f"{name}.parametrizations.{wname}.{idx}."
            skip |= {k for k in model.state_dict() if k.startswith(own)}
    for key, t in model.state_dict().items():
        if key not in skip and key not in tensors:
            tensors[key] = t
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return tensors, layers


class PackedWeight(nn.Module):
    """Weight parametrization of a converted layer: ignores its input and returns the weight
    dequantized from the stored codes (its buffers)."""

    def __init__(self, fmt: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().__init__()
        self.fmt, self.meta = fmt, meta
        for k, t in tensors.items():
            self.register_buffer(k, t)

    def forward(self, _: Tensor) -> Tensor:
        t = {k: b for k, b in self.named_buffers(recurse=False)}
        w = FORMATS[self.fmt].load(t, self.meta, self.meta["k"])
        return w.reshape(self.meta["shape"])


@torch.no_grad()
def load_packed(model: nn.Module, tensors: dict[str, Tensor], doc: dict[str, Any]) -> nn.Module:
    """Install the export into ``model`` (prepared with the same qat config), in place."""
    own: set[str] = set()
    for entry, meta in doc["layers"].items():
        name, wname = meta.get("module", entry), meta.get("tensor", "weight")
        m = model.get_submodule(name)
        q = weight_quantizer(m, wname)
        if q is None:
            raise ValueError(f"layer {entry} has no weight quantizer; prepare the model with the "
                             "export's qat config first")
        _, idx = _quantizer_input(m, wname)
        prefix = f"{name}.{wname}."
        mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        m.parametrizations[wname][idx] = PackedWeight(meta["format"], mine, meta)
        own |= {prefix + k for k in mine} | {f"{name}.parametrizations.{wname}.original"}
    state = model.state_dict()
    rest = {k: v for k, v in tensors.items() if k in state and k not in own}
    missing = [k for k in state if k not in rest and k not in own
               and ".parametrizations." not in k]
    if missing:
        raise ValueError(f"export lacks {len(missing)} entries of this model, e.g. {missing[:3]}")
    model.load_state_dict(rest, strict=False)
    return model

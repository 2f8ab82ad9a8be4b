"""QAT of PyTorch's own attention: ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``
/ ``nn.TransformerDecoderLayer``, which call it).

``nn.MultiheadAttention`` keeps its q/k/v projection in parameters of its own, ``in_proj_weight``
(3E × E), or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim``
differ from E, and passes them, with ``out_proj.weight``, to ``F.multi_head_attention_forward``
(or to the fused kernels of the inference fast path). Every path reads them as attributes, so a
parametrization on them is what the attention computes with:

* the attention module is a layer of its own in the plan (type ``MultiheadAttention``): its
  weight slot quantizes the q/k/v projection (one quantizer per tensor), its act slot quantizes
  its inputs (query, key, value; a tensor passed twice, as in self-attention, is quantized once
  and stays one tensor, so the attention keeps its packed path);
* ``out_proj`` is an ``nn.Linear`` whose ``forward`` the attention never calls: its weight is
  quantized (a parametrization), an input quantizer would never run (a rule that puts one there
  is a :class:`~dqt.errors.ConfigError`; the default leaves it out and the plan says so), and its
  grad slot runs as a forward hook on the attention, whose first output is out_proj's output;
* the gradient of the q/k/v projections' output is inside ``F.multi_head_attention_forward``: no
  hook reaches it (a rule's grad slot on the attention is an error, the default leaves it out);
* an input quantizer that rescales the layer's output (``xnor``'s K) cannot be applied to the
  attention, whose output is not linear in its input.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

#: slot → why it cannot run, for the output projection of an ``nn.MultiheadAttention``
OUT_PROJ = {"act": "nn.MultiheadAttention never calls out_proj.forward "
                   "(F.multi_head_attention_forward reads out_proj.weight), so an input "
                   "quantizer there would never run"}
#: the same, short, for the plan's column
OUT_PROJ_SHORT = {"act": "never called: MultiheadAttention reads out_proj.weight"}
MHA_GRAD = ("the q/k/v projections run inside F.multi_head_attention_forward, so no hook "
            "reaches the gradient of their output")
MHA_GRAD_SHORT = "q/k/v projections are inside F.multi_head_attention_forward"
MHA_SCALE = ("{q} rescales the layer's output by its K, and the attention's output is not "
             "linear in its input")


def weight_names(module: nn.Module) -> tuple[str, ...]:
    """The weight tensors a weight quantizer takes on ``module``: ``weight``, or the q/k/v
    projection of an ``nn.MultiheadAttention``."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    return ("weight",)


def out_projections(model: nn.Module) -> dict[nn.Module, tuple[str, nn.Module]]:
    """``out_proj`` module → (name, module) of the ``nn.MultiheadAttention`` that owns it."""
    return {m.out_proj: (n, m) for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def unreachable(module: nn.Module, slot: str, quantizer: Any, is_out_proj: bool
                ) -> Optional[tuple[str, str]]:
    """(why, short why) a quantizer of class ``quantizer`` in ``slot`` of ``module`` would never
    run (or could not run correctly); None when it runs."""
    if is_out_proj and slot in OUT_PROJ:
        return OUT_PROJ[slot], OUT_PROJ_SHORT[slot]
    if isinstance(module, nn.MultiheadAttention):
        if slot == "grad":
            return MHA_GRAD, MHA_GRAD_SHORT
        if slot == "act" and hasattr(quantizer, "output_scale"):
            return MHA_SCALE.format(q=quantizer.name), f"{quantizer.name} rescales the output"
    return None


def quantize_attention_inputs(module: nn.Module, args: tuple, kwargs: dict
                              ) -> tuple[tuple, dict]:
    """Forward pre-hook (with kwargs) of an ``nn.MultiheadAttention``: query, key and value
    through ``module.input_quantizer``, each distinct tensor once."""
    names = ("query", "key", "value")
    args, kwargs = list(args), dict(kwargs)
    done: dict[int, torch.Tensor] = {}
    for i, name in enumerate(names):
        if i < len(args):
            holder, key = args, i
        elif name in kwargs:
            holder, key = kwargs, name  # type: ignore[assignment]
        else:
            continue
        x = holder[key]
        if isinstance(x, torch.Tensor):
            if id(x) not in done:
                done[id(x)] = module.input_quantizer(x)
            holder[key] = done[id(x)]
    return tuple(args), kwargs


def quantize_out_proj_grad(module: nn.Module, args: tuple, out: Any) -> Any:
    """Forward hook of an ``nn.MultiheadAttention``: its first output is ``out_proj``'s output;
    pass it through ``out_proj.grad_quantizer`` (identity forward, quantized backward)."""
    q = module.out_proj.grad_quantizer
    if isinstance(out, tuple):
        return (q(out[0]), *out[1:])
    return q(out)

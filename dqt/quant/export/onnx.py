"""Export a fake-quant model to ONNX with QuantizeLinear/DequantizeLinear (QDQ) nodes.

``export_onnx(model, example, path)`` writes an ONNX file (opset 21) that onnxruntime runs on
CPU and whose outputs equal the fake-quant model's up to the rounding of fp32 arithmetic:

* **weights** of Linear, Conv and Embedding layers whose quantizer encodes to ``affine`` or
  ``affine_group`` (:mod:`dqt.quant.export.codes`) are stored as integers, int8/uint8 (int4/uint4
  at 4 bits or fewer), and dequantized by ``DequantizeLinear``: per output channel
  (``axis``), or per group of G input values (``block_size`` G, opset 21). Symmetric codes are
  stored signed with no zero point; other codes unsigned with their zero points; the 1-bit
  code of ±α (zero ½) is stored as ±1 with scale α. A Linear's weight is stored transposed,
  (in, out), and multiplied by ``MatMul``.
* **input activations** of those layers quantized by ``int`` or ``uint``: a static
  ``QuantizeLinear`` → ``DequantizeLinear`` pair with the trained observer's scale and zero
  point (per tensor); codes are 8-bit, and a narrower range (``int``'s narrow ±(2^(k−1) − 1),
  k < 8) is a ``Clip`` before the ``QuantizeLinear``. Per token (``per_token: true``), the scale
  and zero point of each row are computed in the graph (``ReduceMin``/``ReduceMax`` …, the
  quantizer's formula), the codes by explicit ops, round(x·(1/S)) + Z as the quantizer rounds
  (``QuantizeLinear`` computes x/S), and ``uint``'s are dequantized by ``DequantizeLinear`` with
  ``block_size`` = the row length, one block per token; ``int``'s absmax x̂ = q/s is explicit
  ops throughout.
* a BatchNorm folded during QAT (``fold_bn``) is folded into the exported layer (its bias is
  :func:`~dqt.quant.bn_fold.folded_bias`) and removed.

Everything else (TTQ's two scales, log/pow2, minifloat, Flexpoint, codebooks, product and
factored codes, ShiftCNN, tanh; activation quantizers other than ``int``/``uint``; quantized
``nn.MultiheadAttention``; per-token inputs of a conv) raises :class:`OnnxExportError` naming the layer and the format
before anything is written. The file is written to a temporary name and renamed.

The float graph comes from ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``):
each quantized layer is swapped for a plain one whose input passes through a marker node, and
the markers and the float weights are then replaced by the QDQ nodes with the ``onnx`` helper
API. Needs the ``onnx`` extra (``onnx``, ``onnxruntime``).
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqt.errors import ConfigError
from dqt.quant.bn_fold import FoldScale, folded_bias
from dqt.quant.export.codes import Affine, AffineGroup, Dense
from dqt.quant.export.convert import _quantizer_input
from dqt.quant.prepare import weight_quantizers

__all__ = ["OnnxExportError", "export_onnx", "plan_onnx", "describe", "run_onnx", "session",
           "output_step", "OPSET"]

OPSET = 21
TORCH_OPSET = 20  # what the TorchScript exporter writes; Q/DQ with block_size need 21
DOMAIN = "dqt"
ACT_QUANTIZERS = ("int", "uint")
TINY = float(np.finfo(np.float32).tiny)
TOKEN_EPS = 1e-5


class OnnxExportError(ConfigError):
    """A layer whose quantizer has no ONNX QDQ form; the message starts with the layer's
    tensor (``features.0.weight: ...``, ``net.2.input: ...``)."""


@dataclass
class _Layer:
    name: str
    kind: str  # linear | conv | embedding
    weight: Optional[Tensor]  # the fake-quant weight as the layer uses it (None: not quantized)
    codes: Any  # Affine | AffineGroup | Dense | None
    bias: Optional[Tensor]
    act: Optional[dict[str, Any]]  # static / per-token activation parameters
    bn: Optional[str]  # folded BatchNorm to remove


# --------------------------------------------------------------------------- checks
def _kind(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(
            m, nn.modules.conv._ConvTransposeNd):
        return "conv"
    if isinstance(m, nn.Embedding):
        return "embedding"
    return None


def _act_params(name: str, q: Any) -> dict[str, Any]:
    key = f"{name}.input"
    if q.name not in ACT_QUANTIZERS:
        raise OnnxExportError(key, f"activation quantizer {q.describe()} has no ONNX QDQ form "
                              f"in this export (supported: {', '.join(ACT_QUANTIZERS)})")
    if q.per_token:
        return {"mode": "token", "signed": q.name == "int", "bits": q.bits, "qmax": q.qmax}
    obs = q.observer
    if obs is None or not bool(obs.initialized):
        raise OnnxExportError(key, f"{q.describe()} has no observed range yet (static "
                              "quantization needs the trained EMA range: train or calibrate "
                              "with qat_step first)")
    if q.name == "int":
        s = torch.clamp(obs.hi.float(), min=1e-12) / q.qmax
        return {"mode": "static", "signed": True, "scale": float(s), "zero": 0,
                "qmin": -q.qmax, "qmax": q.qmax}
    lo, hi = torch.clamp(obs.lo.float(), max=0.0), torch.clamp(obs.hi.float(), min=0.0)
    s = torch.clamp(hi - lo, min=1e-12) / q.qmax
    z = torch.clamp(torch.round(-lo / s), 0, q.qmax)
    return {"mode": "static", "signed": False, "scale": float(s), "zero": int(z),
            "qmin": 0, "qmax": q.qmax}


@torch.no_grad()
def plan_onnx(model: nn.Module) -> list[_Layer]:
    """The quantized layers of ``model`` and how each is expressed; raises
    :class:`OnnxExportError` for the first one ONNX QDQ cannot express."""
    layers = []
    for name, m in model.named_modules():
        wq = weight_quantizers(m)
        aq = getattr(m, "input_quantizer", None)
        if not wq and aq is None:
            continue
        if isinstance(m, nn.MultiheadAttention):
            raise OnnxExportError(name, "a quantized nn.MultiheadAttention is not supported by "
                                  "the ONNX export (its projections run inside "
                                  "F.multi_head_attention_forward)")
        kind = _kind(m)
        if kind is None:
            raise OnnxExportError(name, f"quantized {type(m).__name__} layers are not supported "
                                  "by the ONNX export (Linear, Conv, Embedding are)")
        weight = codes = bn = None
        bias = m.bias.detach().float() if getattr(m, "bias", None) is not None else None
        if "weight" in wq:
            q = wq["weight"]
            w, _ = _quantizer_input(m, "weight")
            was = q.training
            q.eval()
            codes = q.encode(w.detach().float())
            q.train(was)
            if not isinstance(codes, (Affine, AffineGroup, Dense)):
                raise OnnxExportError(f"{name}.weight", f"{q.describe()} exports as "
                                      f"'{codes.format}', which ONNX QDQ cannot express "
                                      "(DequantizeLinear is scale·(q − zero_point) with integer "
                                      "q; supported: affine, affine_group)")
            if isinstance(codes, AffineGroup) and kind == "embedding":
                raise OnnxExportError(f"{name}.weight", "per-group Embedding weights are not "
                                      "supported by the ONNX export")
            if isinstance(codes, (Affine, AffineGroup)):
                _onnx_codes(codes, f"{name}.weight")  # refuses non-integer zero points early
            weight = m.weight.detach().float()
            fold = m.parametrizations.weight[0]
            if isinstance(fold, FoldScale):
                bn = next(n for n, mod in model.named_modules() if mod is fold.bn)
                bias = folded_bias(m, fold.bn).float()
        act = _act_params(name, aq) if aq is not None and kind != "embedding" else None
        if act is not None and act["mode"] == "token":
            if kind != "linear":
                raise OnnxExportError(f"{name}.input", "per-token activations are exported "
                                      "for Linear layers only")
            act["row"] = m.in_features
        if getattr(m, "padding_mode", "zeros") != "zeros":
            raise OnnxExportError(name, f"padding_mode={m.padding_mode!r} is not supported by "
                                  "the ONNX export")
        layers.append(_Layer(name, kind, weight, codes, bias, act, bn))
    return layers


def _onnx_codes(c: Any, key: str) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], int]:
    """(values (N, K) int, scale, zero point or None, storage bits 4|8) of affine codes, so
    that W = scale·(values − zero)."""
    codes = c.codes.to(torch.int32)
    zero, scale = c.zero.double(), c.scale.float()
    grouped = isinstance(c, AffineGroup)
    zc = zero.repeat_interleave(codes.shape[1] // zero.shape[1], 1) if grouped else zero[:, None]
    if not torch.all(zero == torch.round(zero)):
        if not torch.all(2 * zero == torch.round(2 * zero)):
            raise OnnxExportError(key, "zero points that are not integers or halves have no "
                                  "ONNX QDQ form")
        # scale·(c − z) = (scale/2)·(2c − 2z): the 1-bit ±α code
        values = (2 * codes - (2 * zc).to(torch.int32)).numpy()
        bits = 4 if c.bits + 1 <= 4 else 8
        return values, (scale / 2).numpy(), None, bits
    bits = 4 if c.bits <= 4 else 8
    values = codes - zc.to(torch.int32)
    if values.min() >= -(1 << (bits - 1)) and values.max() < (1 << (bits - 1)):
        return values.numpy(), scale.numpy(), None, bits  # signed, zero point 0
    if zero.min() < 0 or zero.max() >= (1 << bits):
        raise OnnxExportError(key, f"zero points outside [0, {(1 << bits) - 1}]")
    return codes.numpy(), scale.numpy(), zero.numpy().astype(np.int64), bits


# --------------------------------------------------------------------------- float graph
class _Marker(torch.autograd.Function):
    """Identity; exported as a ``dqt::ActQuant`` node that names the layer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: str) -> Tensor:  # noqa: ARG004
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, layer: str) -> Any:
        y = g.op(f"{DOMAIN}::ActQuant", x, layer_s=layer)
        y.setType(x.type())
        return y


class _Plain(nn.Module):
    """A quantized layer as plain ops on its fake-quant weight, input through the marker."""

    def __init__(self, layer: _Layer, m: nn.Module) -> None:
        super().__init__()
        self.layer, self.kind = layer.name, layer.kind
        self.act = layer.act is not None
        w = layer.weight if layer.weight is not None else m.weight.detach().float()
        if self.kind == "linear":
            self.weight_t = nn.Parameter(w.t().contiguous())
        else:
            self.weight = nn.Parameter(w.clone())
        self.bias = nn.Parameter(layer.bias.clone()) if layer.bias is not None else None
        if self.kind == "conv":
            self.dim = w.dim() - 2
            self.conv_args = (m.stride, m.padding, m.dilation, m.groups)
        if self.kind == "embedding":
            self.padding_idx = m.padding_idx

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "embedding":
            return F.embedding(x, self.weight, self.padding_idx)
        if self.act:
            x = _Marker.apply(x, self.layer)
        if self.kind == "linear":
            y = torch.matmul(x, self.weight_t)
            return y + self.bias if self.bias is not None else y
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dim - 1]
        return conv(x, self.weight, self.bias, *self.conv_args)


def _plain_model(model: nn.Module, layers: list[_Layer]) -> nn.Module:
    out = copy.deepcopy(model).eval()
    for m in out.modules():
        if getattr(m, "grad_quantizer", None) is not None:
            m._forward_hooks.clear()  # gradient quantizers: the identity in the forward pass
    for lay in layers:
        plain = _Plain(lay, model.get_submodule(lay.name))
        _set(out, lay.name, plain)
        if lay.bn is not None:
            _set(out, lay.bn, nn.Identity())
    return out


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _torch_export(model: nn.Module, example: Tensor, markers: bool) -> Any:
    import onnx

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), f, dynamo=False, opset_version=TORCH_OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          custom_opsets={DOMAIN: 1} if markers else None,
                          do_constant_folding=True)
    return onnx.load_from_string(f.getvalue())


# --------------------------------------------------------------------------- QDQ surgery
class _Graph:
    """New nodes and initializers for a graph, with unique names."""

    def __init__(self, proto: Any) -> None:
        self.proto, self.n = proto, 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.proto.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def ints(self, name: str, values: np.ndarray, signed: bool, bits: int) -> str:
        from onnx import TensorProto, helper, numpy_helper

        if bits == 8:
            t = numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
        else:  # two codes a byte, the first in the low nibble
            v = values.astype(np.int64).reshape(-1) & 0xF
            v = np.concatenate([v, np.zeros(v.size % 2, np.int64)])
            packed = (v[0::2] | (v[1::2] << 4)).astype(np.uint8).tobytes()
            t = helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4,
                                   list(values.shape), packed, raw=True)
        self.proto.graph.initializer.append(t)
        return name


def _weight_nodes(g: _Graph, lay: _Layer) -> list[Any]:
    from onnx import helper, numpy_helper

    key = f"{lay.name}.weight"
    pname = f"{lay.name}.weight_t" if lay.kind == "linear" else key
    inits = g.proto.graph.initializer
    idx = next((i for i, t in enumerate(inits) if t.name == pname), None)
    if idx is None:
        raise RuntimeError(f"{pname}: not an initializer of the exported graph")
    shape = list(numpy_helper.to_array(inits[idx]).shape)
    del inits[idx]
    values, scale, zero, bits = _onnx_codes(lay.codes, key)
    signed = zero is None
    grouped = isinstance(lay.codes, AffineGroup)
    attrs: dict[str, int] = {}
    reshape = None
    if grouped:
        gsize = values.shape[1] // scale.shape[1]
        attrs["block_size"] = gsize
    if lay.kind == "linear":  # stored (in, out), as MatMul takes it
        values, scale = values.T, scale.T
        zero = zero.T if zero is not None else None
        attrs["axis"] = 0 if grouped else 1
    elif lay.kind == "conv" and not grouped:
        values = values.reshape(shape)
        attrs["axis"] = 0
    else:  # embedding (N, K) per row; a conv's groups span in·kh·kw: (N, K), then Reshape
        attrs["axis"] = 1 if grouped else 0
        reshape = shape if lay.kind == "conv" else None
    q = g.ints(f"{lay.name}.weight_q", np.ascontiguousarray(values), signed, bits)
    inputs = [q, g.const(f"{lay.name}.weight_scale", np.ascontiguousarray(scale, np.float32))]
    if zero is not None:
        inputs.append(g.ints(f"{lay.name}.weight_zero", np.ascontiguousarray(zero), False, bits))
    out = g.name(pname) if reshape else pname
    nodes = [helper.make_node("DequantizeLinear", inputs, [out], name=g.name("dq"), **attrs)]
    if reshape:
        shp = g.const("shape", np.array(reshape, np.int64))
        nodes.append(helper.make_node("Reshape", [out, shp], [pname], name=g.name("reshape")))
    return nodes


def _act_nodes(g: _Graph, lay: _Layer, x: str, y: str) -> list[Any]:
    from onnx import TensorProto, helper

    a = lay.act
    f32 = lambda v: g.const("c", np.array(v, np.float32))  # noqa: E731
    node = lambda op, ins, **kw: helper.make_node(  # noqa: E731
        op, ins, [g.name(f"{lay.name}.{op.lower()}")], name=g.name(op), **kw)
    nodes: list[Any] = []

    def add(n: Any) -> str:
        nodes.append(n)
        return n.output[0]

    if a["mode"] == "static":
        s = np.float32(a["scale"])
        lo, hi = (-128, 127) if a["signed"] else (0, 255)
        if a["qmin"] > lo or a["qmax"] < hi:  # a narrower range than the 8-bit code
            x = add(node("Clip", [x, f32(np.float32(a["qmin"] - a["zero"]) * s),
                                  f32(np.float32(a["qmax"] - a["zero"]) * s)]))
        zp = g.const("zp", np.array(a["zero"], np.int8 if a["signed"] else np.uint8))
        q = add(node("QuantizeLinear", [x, f32(s), zp]))
        nodes.append(helper.make_node("DequantizeLinear", [q, f32(s), zp], [y],
                                      name=g.name("dq")))
        return nodes
    # per token: the scale (and zero point) of each row computed in the graph, and the codes
    # by the quantizer's own formula x·(1/S) (QuantizeLinear's x/S rounds differently)
    axes = g.const("axes", np.array([-1], np.int64))
    qmax = f32(float(a["qmax"]))
    if a["signed"]:  # absmax: s = qmax / max(max|x|, 1e-5), x̂ = clamp(round(x·s))/s
        m = add(node("ReduceMax", [add(node("Abs", [x])), axes], keepdims=1))
        sc = add(node("Div", [qmax, add(node("Max", [m, f32(TOKEN_EPS)]))]))
        q = add(node("Clip", [add(node("Round", [add(node("Mul", [x, sc]))])),
                              f32(float(-a["qmax"] - 1)), qmax]))
        nodes.append(helper.make_node("Div", [q, sc], [y], name=g.name("div")))
        return nodes
    # torchao's per-token asymmetric qparams, then DequantizeLinear with one block per row
    lo = add(node("Min", [add(node("ReduceMin", [x, axes], keepdims=1)), f32(0.0)]))
    hi = add(node("Max", [add(node("ReduceMax", [x, axes], keepdims=1)), f32(0.0)]))
    sc = add(node("Max", [add(node("Div", [add(node("Sub", [hi, lo])), qmax])), f32(TINY)]))
    z = add(node("Clip", [add(node("Neg", [add(node("Round", [add(node("Div", [lo, sc]))]))])),
                          f32(0.0), qmax]))
    r = add(node("Round", [add(node("Mul", [x, add(node("Reciprocal", [sc]))]))]))
    q = add(node("Cast", [add(node("Clip", [add(node("Add", [r, z])), f32(0.0), qmax]))],
                 to=TensorProto.UINT8))
    zp = add(node("Cast", [z], to=TensorProto.UINT8))
    nodes.append(helper.make_node("DequantizeLinear", [q, sc, zp], [y], name=g.name("dq"),
                                  axis=-1, block_size=int(a["row"])))
    return nodes


def _to_qdq(proto: Any, layers: list[_Layer]) -> Any:
    from onnx import helper

    g = _Graph(proto)
    by_name = {lay.name: lay for lay in layers}
    front = []
    for lay in layers:
        if isinstance(lay.codes, (Affine, AffineGroup)):
            front += _weight_nodes(g, lay)
    body = []
    for n in proto.graph.node:
        if n.domain == DOMAIN and n.op_type == "ActQuant":
            layer = next(a.s.decode() for a in n.attribute if a.name == "layer")
            body += _act_nodes(g, by_name[layer], n.input[0], n.output[0])
        else:
            body.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(front + body)
    imports = [o for o in proto.opset_import if o.domain not in ("", DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", OPSET), *imports])
    return proto


# --------------------------------------------------------------------------- public
def describe(lay: _Layer) -> str:
    """One line: how a layer is expressed in the ONNX file."""
    parts = []
    c = lay.codes
    if isinstance(c, (Affine, AffineGroup)):
        _, _, zero, bits = _onnx_codes(c, lay.name)
        typ = f"{'u' if zero is not None else ''}int{bits}"
        gran = (f"per group of {c.codes.shape[1] // c.scale.shape[1]} (block_size)"
                if isinstance(c, AffineGroup) else "per channel")
        parts.append(f"weight {typ} {gran}")
    elif isinstance(c, Dense):
        parts.append("weight fp32")
    if lay.act is not None:
        a = lay.act
        typ = "int8" if a["signed"] else "uint8"
        how = "static per tensor" if a["mode"] == "static" else (
            "per token (explicit ops)" if a["signed"] else "per token (DequantizeLinear "
            "block_size = row)")
        parts.append(f"input {typ} {how}")
    if lay.bn:
        parts.append(f"{lay.bn} folded")
    return ", ".join(parts)


def export_onnx(model: nn.Module, example: Tensor, path: str) -> dict[str, Any]:
    """Write ``model`` (fake-quant or plain, eval mode) as ONNX to ``path`` with QDQ nodes;
    ``example`` is one input batch (its batch dimension becomes dynamic). Returns
    ``{"layers": {name: description}, "bytes": file size}``. Raises :class:`OnnxExportError`
    for a layer with no ONNX form, before anything is written."""
    import onnx

    layers = plan_onnx(model)
    with torch.no_grad():
        markers = any(lay.act is not None for lay in layers)
        proto = _to_qdq(_torch_export(_plain_model(model, layers), example, markers), layers)
    onnx.checker.check_model(proto)
    tmp = f"{path}.partial"
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"layers": {lay.name: describe(lay) for lay in layers},
            "bytes": os.path.getsize(path)}


def session(path: str, threads: int = 0, optimize: bool = True) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads`` 0: onnxruntime's default).
    ``optimize=False``: no graph optimizations, so the graph runs as written; onnxruntime's
    own (the default) fuse the QDQ pairs into integer kernels and quantize a layer's bias to
    int32 at scale s_x·s_w, which moves the outputs by a fraction of a step."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session: Any, x: Tensor, optimize: bool = True) -> Tensor:
    """The ONNX model's output on ``x`` (run by onnxruntime on CPU) as a tensor."""
    s = (session(path_or_session, optimize=optimize) if isinstance(path_or_session, str)
         else path_or_session)
    return torch.from_numpy(s.run(None, {"input": x.numpy()})[0])


def output_step(ref: Tensor) -> float:
    """One 8-bit quantization step of the output: (max − min)/255 of ``ref``."""
    return float(ref.max() - ref.min()) / 255

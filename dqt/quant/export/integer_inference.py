"""Integer-arithmetic-only inference of a ``qat=w8a8`` model (Jacob et al. 2018, arXiv 1712.05877,
§2; the arithmetic of gemmlowp and TFLite).

Every quantized ``nn.Linear`` / ``nn.Conv2d`` (int8 symmetric weights q_w with per-channel scale
S_w[n] and zero point 0; uint8 affine or int8 symmetric input activations q_a with S_a, Z_a
from the EMA range) computes::

    acc[m, n] = Σ_k (q_a[m, k] − Z_a)·q_w[n, k] + q_b[n]      int8 × int8 → int32
    q_b[n]    = round(b[n] / (S_a·S_w[n]))                    int32 bias, zero point 0

The GEMM is ``torch._int_mm`` (int8 × int8 → int32; uint8 codes enter as q_a − 128 with zero
point Z_a − 128, and (Z_a − 128)·Σ_k q_w[n, k] is subtracted through the bias); a conv pads
its int8 input with the zero point and concatenates its kh·kw taps (NHWC) into the GEMM's
rows. When the layer's output goes, through ReLU / max-pool / flatten / dropout only, into
another quantized layer, it is requantized to that layer's input codes::

    M[n] = S_a·S_w[n] / S_out = M0[n]·2^(shift[n] − 31),  M0 ∈ [2^30, 2^31)
    q_out = clamp(Z_out + RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc, M0), −shift),
                  lo, hi)

with gemmlowp's two primitives (:func:`srdhm`, :func:`rounding_divide_by_pot`; a left shift
first when M ≥ 1); a ReLU on the way is fused as lo = Z_out; max-pool and flatten run on the
codes. Elsewhere (the next layer is fp32, or the graph does something else) the layer returns
S_a·S_w[n]·acc in fp32, and a quantized layer whose input is fp32 quantizes it with its own
quantizer's formula. A BatchNorm folded during QAT (``fold_bn``) disappears: its folded bias
is the layer's bias.

:func:`to_integer` builds this model with ``torch.fx`` from a prepared, calibrated model; it
refuses a quantized layer of any other format, naming the layer.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from dqt.quant.bn_fold import FoldScale, folded_bias
from dqt.quant.export.convert import _quantizer_input
from dqt.quant.methods.integer import IntSymmetric, UIntAffine
from dqt.quant.prepare import weight_quantizer

__all__ = ["IntegerLayer", "to_integer", "quantize_multiplier", "srdhm", "rounding_divide_by_pot",
           "multiply_by_quantized_multiplier"]

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


# ------------------------------------------------------------------ fixed-point arithmetic
def quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: m > 0 as (M0, shift), m ≈ M0·2^(shift − 31),
    M0 ∈ [2^30, 2^31)."""
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"the requantization multiplier must be finite and > 0; got {m}")
    q, shift = math.frexp(m)  # m = q·2^shift, q ∈ [0.5, 1)
    m0 = round(q * 2 ** 31)
    if m0 == 2 ** 31:
        m0, shift = m0 // 2, shift + 1
    return m0, shift


def srdhm(a: Tensor, b: Tensor) -> Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` on int32 values held in int64:
    (a·b + nudge) / 2^31 truncated toward zero, nudge = 2^30 (a·b ≥ 0) or 1 − 2^30, which for
    every sign equals ⌊(a·b + 2^30) / 2^31⌋ (round half up), computed here as an arithmetic
    shift; the one overflow, INT32_MIN·INT32_MIN, saturates to INT32_MAX."""
    a, b = a.long(), b.long()
    out = (a * b + (1 << 30)) >> 31
    return torch.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, out)


def rounding_divide_by_pot(x: Tensor, exponent: Tensor) -> Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: x / 2^exponent rounded to nearest, ties away from
    zero (arithmetic shift plus the remainder test); int64 in, exponent ≥ 0."""
    x, e = torch.broadcast_tensors(x.long(), exponent.long())
    mask = (torch.ones_like(e) << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).long()
    return (x >> e) + (remainder > threshold).long()


def multiply_by_quantized_multiplier(x: Tensor, m0: Tensor, shift: Tensor) -> Tensor:
    """TFLite's ``MultiplyByQuantizedMultiplier``: x·M0·2^(shift − 31), x int32 (in int64).
    A left shift (M ≥ 1) saturates x·2^shift to int32 first."""
    shift = shift.long()
    left = torch.clamp(shift, min=0)
    xs = torch.clamp(x.long() << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(srdhm(xs, m0), torch.clamp(-shift, min=0))


# ------------------------------------------------------------------ the integer layer
def _act_params(q: nn.Module) -> tuple[float, int, int, int]:
    """(S, Z, qmin, qmax) of a calibrated 8-bit activation quantizer (fp32 scale as it uses)."""
    probe = torch.zeros(1)
    if isinstance(q, UIntAffine):
        s, z = q._params(probe)
        return float(s), int(z), 0, q.qmax
    s = q._scale(probe)
    return float(s), 0, -q.qmax, q.qmax


class IntegerLayer(nn.Module):
    """A Linear or Conv2d on int8 codes: fp32 input → its codes (the layer's input quantizer);
    integer input = codes already. Output: the next layer's codes (``requantize``) or fp32."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        wq, aq = weight_quantizer(layer), layer.input_quantizer
        self.name = name
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv:
            self.kernel, self.stride = layer.kernel_size, layer.stride
            self.padding = layer.padding
        w, _ = _quantizer_input(layer)
        w = w.detach().float()
        with torch.no_grad():
            s_w = wq._scale(w).reshape(-1).expand(w.shape[0]).float()
            codes = torch.round(torch.clamp(w / wq._scale(w), -wq.qmax, wq.qmax))
        if self.conv:  # K ordered (kh, kw, C), as gemm_rows lays out the taps
            codes = codes.permute(0, 2, 3, 1)
        codes = codes.reshape(w.shape[0], -1).to(torch.int8)
        self.s_in, self.z_in, self.in_min, self.in_max = _act_params(aq)
        self.in_unsigned = isinstance(aq, UIntAffine)
        fold = layer.parametrizations.weight[0]
        b = folded_bias(layer, fold.bn) if isinstance(fold, FoldScale) else layer.bias
        b = torch.zeros(w.shape[0]) if b is None else b.detach().float()
        acc_scale = torch.tensor(self.s_in, dtype=torch.float64) * s_w.double()  # S_a·S_w[n]
        bias = torch.clamp(torch.round(b.double() / acc_scale), INT32_MIN, INT32_MAX).long()
        z_shift = self.z_in - 128 if self.in_unsigned else 0  # the GEMM's int8 zero point
        self.register_buffer("weight_t", codes.t().contiguous())  # (K, N) int8
        # Σ_k (q_a − Z_a)·q_w = (q_a − 128)·q_w − (Z_a − 128)·Σ_k q_w, the second term
        # folded into the bias
        self.register_buffer("bias", bias.to(torch.int32))
        self.register_buffer("offset", bias - z_shift * codes.long().sum(1))
        self.register_buffer("acc_scale", acc_scale.float())  # fp32 dequantization
        self.register_buffer("acc_scale64", acc_scale)  # S_a·S_w exactly (fp32 × fp32 in fp64)
        self.z_shift = z_shift
        # |acc| ≤ K·255·127 + max|q_b|: below 2^31, the int32 accumulator cannot overflow and
        # needs no saturation
        self.fits_int32 = codes.shape[1] * 255 * 127 + int(bias.abs().max()) < 2 ** 31
        self.out_codes = False

    def requantize(self, s_out: float, z_out: int, lo: int, hi: int, unsigned: bool) -> None:
        """Emit codes of scale ``s_out``, zero point ``z_out``, clamped to [lo, hi]."""
        m = self.acc_scale64 / s_out
        pairs = [quantize_multiplier(float(v)) for v in m]
        self.register_buffer("m0", torch.tensor([p[0] for p in pairs], dtype=torch.int64))
        self.register_buffer("shift", torch.tensor([p[1] for p in pairs], dtype=torch.int64))
        self.z_out, self.lo, self.hi = z_out, lo, hi
        self.out_dtype = torch.uint8 if unsigned else torch.int8
        self.out_codes = True
        e = torch.clamp(-self.shift, min=0)  # RoundingDivideByPOT's exponent per channel
        self.register_buffer("left", torch.clamp(self.shift, min=0))
        self.register_buffer("exponent", e)
        self.register_buffer("rdbp_half", (torch.ones_like(e) << e) >> 1)
        self.register_buffer("tie_down", (e > 0).long())

    def requantize_acc(self, acc: Tensor) -> Tensor:
        """MultiplyByQuantizedMultiplier(acc, M0, shift) + Z_out, clamped; in place on acc.
        The same integers as :func:`multiply_by_quantized_multiplier`, in fewer passes:
        SRDHM's saturation cannot occur (M0 ≥ 2^30 ≠ INT32_MIN), and RoundingDivideByPOT(t, e)
        = (t + 2^(e−1) − [t < 0]) >> e for e ≥ 1 (ties away from zero)."""
        if bool((self.left > 0).any()):
            acc = torch.clamp(acc << self.left, INT32_MIN, INT32_MAX)
        t = acc.mul_(self.m0).add_(1 << 30).bitwise_right_shift_(31)  # SRDHM
        neg = t.lt(0).to(torch.int64).mul_(self.tie_down)
        t.add_(self.rdbp_half).sub_(neg).bitwise_right_shift_(self.exponent)  # RDBP
        return t.add_(self.z_out).clamp_(self.lo, self.hi).to(self.out_dtype)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input quantizer's codes, with its own fp32 operations (bit-equal to QAT)."""
        x = x.float()
        if self.in_unsigned:
            return torch.clamp(torch.round(x / self.s_in) + self.z_in, 0, self.in_max) \
                .to(torch.uint8)
        return torch.round(torch.clamp(x / self.s_in, -self.in_max, self.in_max)).to(torch.int8)

    def gemm_rows(self, q: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """The int8 GEMM operand (rows × K) of input codes q, and the output's leading shape."""
        a = (q.to(torch.int16) - 128).to(torch.int8) if self.in_unsigned else q
        if not self.conv:
            return a.reshape(-1, a.shape[-1]), tuple(a.shape[:-1])
        ph, pw = self.padding
        a = F.pad(a, (pw, pw, ph, ph), value=self.z_shift)  # padding is the real value 0
        a = a.permute(0, 2, 3, 1).contiguous()  # NHWC: each tap is a run of C bytes
        (kh, kw), (sh, sw) = self.kernel, self.stride
        b, h, w = a.shape[:3]
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        taps = [a[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
                for i in range(kh) for j in range(kw)]
        return torch.cat(taps, dim=-1).reshape(b * oh * ow, -1), (b, oh, ow)

    def accumulate(self, q: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """int32 acc = Σ(q_a − Z_a)·q_w + q_b, as int64 (rows, N)."""
        a, lead = self.gemm_rows(q)
        acc = torch._int_mm(a.contiguous(), self.weight_t) + self.offset  # int32 + int64
        return acc if self.fits_int32 else torch.clamp(acc, INT32_MIN, INT32_MAX), lead

    def forward(self, x: Tensor) -> Tensor:
        q = self.quantize_input(x) if x.is_floating_point() else x
        acc, lead = self.accumulate(q)
        if self.out_codes:
            y = self.requantize_acc(acc)
        else:
            y = acc.float() * self.acc_scale
        y = y.reshape(*lead, -1)
        return y.permute(0, 3, 1, 2).contiguous() if self.conv else y

    def extra_repr(self) -> str:
        k, n = self.weight_t.shape
        out = f"codes(z={self.z_out}, [{self.lo}, {self.hi}])" if self.out_codes else "fp32"
        kind = f"conv{tuple(self.kernel)}" if self.conv else "linear"
        return f"{self.name}: {kind} K={k} N={n} in(S={self.s_in:.4g}, Z={self.z_in}) → {out}"


# ------------------------------------------------------------------ checks
def _refuse(name: str, why: str) -> None:
    raise ValueError(f"to_integer: layer {name!r} {why}; integer-only inference takes "
                     "nn.Linear / nn.Conv2d with int 8-bit per-channel or per-tensor weights "
                     "(qat 'int', bits=8) and uint/int 8-bit per-tensor EMA input activations "
                     "(as qat=w8a8)")


def _check(name: str, m: nn.Module) -> bool:
    """True when ``m`` is a quantized layer to_integer runs; raise on unsupported ones."""
    wq, aq = weight_quantizer(m), getattr(m, "input_quantizer", None)
    if wq is None and aq is None:
        return False
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        cls = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
        _refuse(name, f"is of type {cls.__name__}")
    if wq is None or aq is None:
        _refuse(name, "quantizes only its " + ("input" if wq is None else "weight"))
    if not (type(wq) is IntSymmetric and wq.bits == 8 and not wq.group_size):
        _refuse(name, f"has weight format {wq.describe()}")
    if not (type(aq) in (IntSymmetric, UIntAffine) and aq.bits == 8 and aq.observer is not None):
        _refuse(name, f"has input activation format {aq.describe()}")
    if not bool(aq.observer.initialized):
        _refuse(name, "has an uncalibrated activation range (run batches and qat_step first)")
    plist = m.parametrizations.weight
    if len(plist) != (2 if isinstance(plist[0], FoldScale) else 1):
        _refuse(name, "has another parametrization on its weight")
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or tuple(m.dilation) != (1, 1)
                                     or m.padding_mode != "zeros" or isinstance(m.padding, str)):
        _refuse(name, "is a grouped, dilated, non-zero-padded or 'same'-padded conv")
    return True


# ------------------------------------------------------------------ the graph
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or \
            super().is_leaf_module(m, qualname)


def _is(node: fx.Node, gm: fx.GraphModule, modules: tuple, functions: tuple,
        methods: tuple) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _is_relu(n: fx.Node, gm: fx.GraphModule) -> bool:
    return _is(n, gm, (nn.ReLU,), (F.relu, torch.relu), ("relu", "relu_"))


def _passes_codes(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Ops that commute with a monotone requantization (or move values only)."""
    return _is_relu(n, gm) or _is(n, gm, (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity),
                                  (F.max_pool2d, torch.flatten), ("flatten", "view", "reshape"))


def _only_user(n: fx.Node) -> Optional[fx.Node]:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _drop(n: fx.Node, gm: fx.GraphModule) -> None:
    n.replace_all_uses_with(n.args[0])
    gm.graph.erase_node(n)


def _set(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


@torch.no_grad()
def to_integer(model: nn.Module) -> fx.GraphModule:
    """An integer-only inference copy of ``model`` (prepared with ``qat=w8a8``-style int8
    quantizers and calibrated); ``model`` is not modified. Layers without quantizers stay fp32.
    Raises ValueError naming the first layer whose quantizers it cannot run."""
    quantized = {name for name, m in model.named_modules() if _check(name, m)}
    if not quantized:
        raise ValueError("to_integer: the model has no quantized Linear / Conv2d layer")
    work = copy.deepcopy(model).eval()
    gm = fx.GraphModule(work, _Tracer().trace(work))
    layers: dict[str, IntegerLayer] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in quantized:
            layer = work.get_submodule(node.target)
            layers[node.target] = IntegerLayer(layer, node.target)
            fold = layer.parametrizations.weight[0]
            if isinstance(fold, FoldScale):  # the BN is in the folded weight and bias
                bn = _only_user(node)
                if bn is None or bn.op != "call_module" or \
                        gm.get_submodule(bn.target) is not fold.bn:
                    _refuse(node.target, "folds a BatchNorm that is not its only consumer")
                _drop(bn, gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in layers:
            continue
        chain, cur = [], node
        while (u := _only_user(cur)) is not None and _passes_codes(u, gm) and u.args[0] is cur:
            chain.append(u)
            cur = u
        nxt = _only_user(cur)
        if nxt is None or nxt.op != "call_module" or nxt.target not in layers or \
                nxt.args[0] is not cur or len(nxt.args) != 1:
            continue  # fp32 out
        succ = layers[nxt.target]
        lo, hi = succ.in_min, succ.in_max
        for u in chain:
            if _is_relu(u, gm):
                lo = max(lo, succ.z_in)  # ReLU on codes: clamp at the zero point, fused
                _drop(u, gm)
        layers[node.target].requantize(succ.s_in, succ.z_in, lo, hi, succ.in_unsigned)
    for target, layer in layers.items():
        _set(gm, target, layer)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def integer_layers(gm: nn.Module) -> dict[str, IntegerLayer]:
    """name → IntegerLayer of a :func:`to_integer` model."""
    return {n: m for n, m in gm.named_modules() if isinstance(m, IntegerLayer)}


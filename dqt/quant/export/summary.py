"""Size summary of a quantized model — Larq's ``lq.models.summary`` is the anchor: parameters
per bit-width, packed size including scales, fp32-equivalent size, compression ratio.

It is computed from what :func:`dqt.quant.export.convert.convert` actually writes, so "packed
size" is the byte count of the exported tensors: the codes at their storage width (1-bit 8 per
byte, ternary 2-bit, k-bit rounded up to 1/2/4/8, log codes int8, Flexpoint int16), plus their
scales and zero points, plus every full-precision tensor (biases, BatchNorm parameters and
statistics, unquantized layers, quantizer state) at its own dtype. "fp32 equivalent" is the same
model with every one of those values in fp32 (4 bytes).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

from torch import Tensor, nn

from dqt.quant.export.convert import convert


def summarize(model: nn.Module, converted: Optional[tuple[dict[str, Tensor], dict[str, Any]]]
              = None) -> dict[str, Any]:
    """The size summary of ``model``: per-layer rows, parameters per bit-width, packed and fp32
    bytes, compression. ``converted``: the ``convert(model)`` result, when already at hand."""
    tensors, layers = converted if converted is not None else convert(model)
    rows = []
    by_bits: dict[str, int] = defaultdict(int)
    packed = fp32 = 0
    claimed: set[str] = set()
    for name, meta in layers.items():
        prefix = f"{meta.get('module', name)}.{meta.get('tensor', 'weight')}."
        keys = [k for k in tensors if k.startswith(prefix)]
        claimed |= set(keys)
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        params = meta["n"] * meta["k"]
        bits = meta.get("storage_bits", meta.get("bits"))
        rows.append({"layer": name, "quantizer": meta["describe"], "format": meta["format"],
                     "bits": bits, "params": params, "bytes": nbytes, "fp32_bytes": 4 * params})
        by_bits[f"{bits}-bit"] += params
        packed += nbytes
        fp32 += 4 * params
    other = other_params = 0
    for k, t in tensors.items():
        if k in claimed or k.endswith(".bias_folded"):
            continue
        nb = t.numel() * t.element_size()
        other += nb
        fp32 += 4 * t.numel()
        if t.is_floating_point():
            other_params += t.numel()
    by_bits["32-bit (full precision)"] += other_params
    packed += other
    return {"layers": rows, "params_by_bits": dict(by_bits), "full_precision_bytes": other,
            "packed_bytes": packed, "fp32_bytes": fp32,
            "compression": fp32 / packed if packed else 1.0}


def format_summary(s: dict[str, Any]) -> str:
    lines = ["| layer | quantizer | format | bits | params | packed bytes | fp32 bytes |",
             "|---|---|---|---|---|---|---|"]
    for r in s["layers"]:
        lines.append(f"| {r['layer']} | {r['quantizer']} | {r['format']} | {r['bits']} | "
                     f"{r['params']:,} | {r['bytes']:,} | {r['fp32_bytes']:,} |")
    lines.append(f"| everything else (fp32) | — | — | 32 | "
                 f"{s['params_by_bits'].get('32-bit (full precision)', 0):,} | "
                 f"{s['full_precision_bytes']:,} | {s['full_precision_bytes']:,} |")
    per = ", ".join(f"{k}: {v:,}" for k, v in s["params_by_bits"].items())
    lines.append("")
    lines.append(f"params per bit-width: {per}")
    lines.append(f"packed size (codes + scales + fp32 rest): {s['packed_bytes']:,} B | fp32 "
                 f"equivalent: {s['fp32_bytes']:,} B | compression {s['compression']:.2f}x")
    return "\n".join(lines)

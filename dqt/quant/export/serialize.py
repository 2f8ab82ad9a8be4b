"""Write a converted model to disk and read it back.

``save_export(model, dir, meta)`` writes::

    <dir>/model.safetensors   {layer}.weight.{packed,scale,zero | code | mantissa,exponent ...}
                              + the remaining state-dict entries under their own names
    <dir>/model.json          format/version, per-layer format + shape + bits (+ folded BN),
                              the caller's metadata (config, data shape), the size summary

``read_export(dir)`` returns ``(tensors, doc)``, which :func:`dqt.quant.export.convert.load_packed`
installs into a model prepared with the same qat config.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import Tensor, nn

from dqt.quant.export.convert import convert
from dqt.quant.export.summary import summarize

FORMAT, VERSION = "dqt.qat-export", 1


def save_export(model: nn.Module, out_dir: str, meta: dict[str, Any] | None = None) -> str:
    """Write ``model.safetensors`` + ``model.json`` into ``out_dir``; returns the json path."""
    from safetensors.torch import save_file

    tensors, layers = convert(model)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".model.safetensors.partial")
    save_file(tensors, tmp, metadata={"format": FORMAT})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    doc = {"format": FORMAT, "version": VERSION, "layers": layers, **(meta or {}),
           "summary": summarize(model, (tensors, layers))}
    path = os.path.join(out_dir, "model.json")
    with open(path + ".partial", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".partial", path)
    return path


def read_export(out_dir: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, doc)`` of the export in ``out_dir`` (``doc``: its ``model.json``)."""
    from safetensors.torch import load_file

    with open(os.path.join(out_dir, "model.json")) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{out_dir}/model.json: not a dqt QAT export (format {doc.get('format')!r})")
    return load_file(os.path.join(out_dir, "model.safetensors")), doc

"""Rebuild a trained QAT model from a run directory (or one checkpoint), export it, load an
export back — the glue between ``dqt.quant.export`` (which knows quantizers, not models) and the
model zoo. Used by ``launch/export.py`` and ``launch/report.py --model``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from dqt.config import SCHEMAS
from dqt.quant.config import QATConfig
from dqt.quant import quantize_
from dqt.quant.export.convert import load_packed
from dqt.quant.export.serialize import read_export, save_export
from dqt.train.data import DataMeta, build_dataset
from dqt.train.models import build_model


def _typed(cls: type, d: dict[str, Any]) -> Any:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), d))


def find_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint dir, run dir) for a run directory or a ``checkpoints/step_*`` directory."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "train.pt")):
        return path, os.path.dirname(os.path.dirname(path))
    root = os.path.join(path, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []
    steps = [d for d in steps if os.path.isfile(os.path.join(root, d, "train.pt"))]
    if not steps:
        raise FileNotFoundError(f"{path}: no checkpoints/step_*/train.pt — not a dqt run directory "
                                "(or the run saved no checkpoint yet)")
    return os.path.join(root, steps[-1]), path


def model_configs(run_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    name = raw["model"]["name"]
    model_cfg = _typed(SCHEMAS["model"]["resnet" if name.startswith("resnet") else name],
                       raw["model"])
    return model_cfg, _typed(QATConfig, raw["qat"]), raw


def build_prepared(model_cfg: Any, qat_cfg: Any, meta: DataMeta) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(model_cfg, meta)
    quantize_(model, qat_cfg)
    return model.eval()


def load_trained(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The fake-quant model of a run (newest checkpoint), eval mode, and its description."""
    ckpt, run_dir = find_checkpoint(path)
    model_cfg, qat_cfg, raw = model_configs(run_dir)
    state = torch.load(os.path.join(ckpt, "train.pt"), map_location="cpu", weights_only=False)
    if "data_meta" in state:
        meta = DataMeta(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in state["data_meta"].items()})
    else:  # checkpoints written before the meta was recorded
        data_cls = SCHEMAS["data"][raw["data"]["name"]]
        meta = build_dataset(_typed(data_cls, raw["data"])).meta
    model = build_prepared(model_cfg, qat_cfg, meta)
    model.load_state_dict(state["model"])
    info = {"run_dir": run_dir, "checkpoint": ckpt, "step": state["step"],
            "model": raw["model"], "qat": raw["qat"], "data_meta": asdict(meta)}
    return model, info


def export_run(path: str, out_dir: str) -> tuple[nn.Module, str]:
    model, info = load_trained(path)
    return model, save_export(model, out_dir, info)


def load_export(out_dir: str) -> nn.Module:
    """An export → a model that dequantizes the packed codes at every forward (eval mode)."""
    tensors, doc = read_export(out_dir)
    name = doc["model"]["name"]
    model_cfg = _typed(SCHEMAS["model"]["resnet" if name.startswith("resnet") else name],
                       doc["model"])
    m = doc["data_meta"]
    meta = DataMeta(m["task"], tuple(m["input_shape"]), m["num_classes"])
    model = build_prepared(model_cfg, _typed(QATConfig, doc["qat"]), meta)
    return load_packed(model, tensors, doc).eval()

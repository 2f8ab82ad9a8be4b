"""Ristretto's quantization analysis as a dqt command (``launch/search_bits.py``): take a trained
fp32 run, evaluate it with conv weights, fc weights and activations quantized one group at a
time at each of ``search.bits``, pick bit-widths within ``search.error_margin`` (the rule:
:mod:`dqt.quant.search`), write the ``qat`` config, optionally fine-tune with it.

Everything that can be wrong with the input (no checkpoint, a negative margin, a checkpoint of
another model or data set, a quantizer that cannot do any of the widths) is checked before the
first evaluation, with one :class:`ConfigError` naming the key. The model and data are built by
the trainer's own code (``build_model``, ``build_dataset``), evaluated by its ``eval_sums`` on
the test split, and activation ranges are calibrated on ``search.calib_batches`` training
batches of the trainer's loader (``dqt.quant.search.calibrate``). One process; fine-tuning runs
the normal trainer in this process (world size 1) and prints the command for more ranks. The
checkpoint of a QAT run works too: its real (latent) weights are the fp32 baseline.

Outputs in the run directory: ``search.json`` (baseline, table, choice, combinations tried),
``qat/<name>.yaml`` (compose it with ``hydra.searchpath=[file://<run dir>] qat=<name>``, or copy it
to ``conf/qat/``: ``search.write``), and with ``search.finetune`` the run ``finetune/``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from dqt.config import CheckpointConfig, SearchBitsConfig, TrainConfig
from dqt.errors import ConfigError, check
from dqt.quant.config import QATConfig
from dqt.quant import quantize_
from dqt.quant.search import (GROUPS, LABELS, Bits, Selection, calibrate, drop_points,
                              layer_types, qat_dict, qat_yaml, refusal, select_bits)
from dqt.train.checkpoint import load_weights
from dqt.train.data import Dataset, ShardedLoader, build_dataset
from dqt.train.export import find_checkpoint
from dqt.train.models import build_model
from dqt.train.trainer import eval_metrics, eval_sums

log = logging.getLogger("dqt")


@dataclass
class SearchResult:
    baseline: float
    table: dict[str, dict[int, Optional[float]]]  # group -> bits -> eval/acc (None: not run)
    notes: dict[str, dict[int, str]]  # why a cell was not run
    selection: Selection
    name: str
    qat: dict[str, Any]  # the written qat config (as YAML data)
    paths: list[str]  # where it was written
    finetune: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # the report printed


def typed_qat(d: dict[str, Any]) -> QATConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QATConfig), d))


@contextlib.contextmanager
def _quiet(name: str = "dqt") -> Iterator[None]:
    """No per-layer plan in the log for each of the many evaluated variants."""
    lg = logging.getLogger(name)
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


class BitSearch:
    def __init__(self, cfg: SearchBitsConfig, run_dir: str) -> None:
        """Validate everything against the checkpoint; no evaluation yet."""
        self.cfg, self.run_dir, s = cfg, run_dir, cfg.search
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.name)
        self.data: Dataset = build_dataset(cfg.data)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, self.data.meta)
        self._check_run(model)
        self.ckpt = load_weights(model, cfg.checkpoint, "checkpoint")
        self.weights = {k: v.clone() for k, v in model.state_dict().items()}
        self.types = layer_types(model)
        self.groups = [g for g in GROUPS if g == "act" or self.types[g]]
        check(any(self.types.values()), "model",
              "has no Conv1d/Conv2d/Conv3d or Linear layer to quantize")
        self.notes: dict[str, dict[int, str]] = {g: {} for g in self.groups}
        for g in self.groups:
            kind = "act" if g == "act" else "weight"
            for b in s.bits:
                why = refusal(s.quantizer, b, kind, s.act_momentum)
                if why is not None:
                    self.notes[g][b] = why
        runnable = [(g, b) for g in self.groups for b in s.bits if b not in self.notes[g]]
        check(bool(runnable), "search.bits", f"{s.quantizer} accepts none of {list(s.bits)} "
              f"for any group ({'; '.join(sorted({n for d in self.notes.values() for n in d.values()}))})")
        self.n_test = len(self.data.test)

    def _check_run(self, model: nn.Module) -> None:
        """The checkpoint's run must be this model and data (its config.yaml and data shape)."""
        cfg = self.cfg
        check(os.path.exists(cfg.checkpoint), "checkpoint", f"{cfg.checkpoint} does not exist "
              "(a run directory, or one of its checkpoints/step_* directories)")
        try:
            ckpt, run_dir = find_checkpoint(cfg.checkpoint)
        except FileNotFoundError as e:
            raise ConfigError("checkpoint", str(e)) from None
        path = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(path):
            with open(path) as f:
                raw = yaml.safe_load(f)
            ours = OmegaConf.to_container(OmegaConf.structured(cfg.model))
            theirs = raw.get("model", {})
            diff = [f"model.{k}={theirs.get(k)!r} there, {ours.get(k)!r} here"
                    for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
            check(not diff, "checkpoint",
                  f"{run_dir} was trained with another model ({'; '.join(diff)}); pass the "
                  "model=/experiment= of that run")
            data_name = raw.get("data", {}).get("name")
            check(data_name in (None, cfg.data.name), "data",
                  f"the checkpoint's run trained on data={data_name}, this search evaluates "
                  f"data={cfg.data.name}")
        meta = torch.load(os.path.join(ckpt, "train.pt"), map_location="cpu",
                          weights_only=False).get("data_meta")
        if meta is not None:
            here = {"task": self.data.meta.task, "input_shape": list(self.data.meta.input_shape),
                    "num_classes": self.data.meta.num_classes}
            there = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in meta.items()}
            check(here == there, "data", f"the checkpoint was trained on data of shape {there}, "
                  f"data={cfg.data.name} gives {here}")

    # ------------------------------------------------------------------ evaluation
    def build(self, bits: dict[str, Bits], name: str = "search") -> nn.Module:
        """The checkpoint's model with ``bits`` per group (missing/None: fp32), calibrated."""
        s = self.cfg.search
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg.model, self.data.meta)
        model.load_state_dict(self.weights)
        if any(b is not None for b in bits.values()):
            with _quiet():
                quantize_(model, typed_qat(qat_dict(bits, s.quantizer, self.types, name,
                                                    s.act_momentum)))
        model.to(self.device)
        calibrate(model, self._calib_batches())
        return model.eval()

    def _calib_batches(self) -> Iterator[torch.Tensor]:
        loader = ShardedLoader(self.data.train, self.cfg.data.batch_size, 0, 1, seed=self.cfg.seed)
        for i, (x, _) in enumerate(loader):
            if i >= self.cfg.search.calib_batches:
                return
            yield x.to(self.device)

    def evaluate(self, bits: dict[str, Bits]) -> float:
        model = self.build(bits)
        sums = eval_sums(model, self.data.test, self.cfg.data.eval_batch_size, self.device,
                         self.autocast)
        return eval_metrics(sums)["eval/acc"]

    # ------------------------------------------------------------------ the search
    def run(self, train_overrides: Optional[list[str]] = None) -> SearchResult:
        s = self.cfg.search
        bits_list = sorted(s.bits, reverse=True)
        baseline = self.evaluate({})
        log.info("fp32 baseline eval/acc %.4f (%s, %d test samples)", baseline, self.ckpt,
                 self.n_test)
        table: dict[str, dict[int, Optional[float]]] = {g: {} for g in self.groups}
        for g in self.groups:
            for b in bits_list:
                table[g][b] = None if b in self.notes[g] else self.evaluate({g: b})
                if table[g][b] is not None:
                    log.info("%s at %d bits: eval/acc %.4f", LABELS[g], b, table[g][b])
        sel = select_bits(table, baseline, s.error_margin, self.evaluate)
        name = s.name or (os.path.splitext(os.path.basename(s.write))[0] if s.write else
                          f"{s.quantizer}_" + "_".join(f"{g}{_b(sel.chosen.get(g))}"
                                                       for g in self.groups))
        qat = qat_dict(sel.chosen, s.quantizer, self.types, name, s.act_momentum)
        typed_qat(qat)  # valid by construction; fail here rather than in a later training
        result = SearchResult(baseline, table, {g: dict(n) for g, n in self.notes.items()}, sel,
                              name, qat, [])
        header = self._header(result)
        text = qat_yaml(qat, header)
        paths = [os.path.join(self.run_dir, "qat", f"{name}.yaml")]
        if s.write:
            paths.append(s.write)
        for p in paths:
            _write_atomic(p, text)
        result.paths = paths
        with open(os.path.join(self.run_dir, "search.json"), "w") as f:
            json.dump(self._json(result), f, indent=1)
        result.text = self.report(result, train_overrides or [])
        print(result.text, flush=True)
        if s.finetune:
            result.finetune = self.finetune(result)
            line = (f"fine-tuned {self.cfg.steps} steps with qat={name}: eval/acc "
                    f"{result.finetune['eval/acc']:.4f} (drop {drop_points(baseline, result.finetune['eval/acc']):.2f}"
                    f" points; before fine-tuning {sel.acc:.4f}) → {result.finetune['run_dir']}")
            print(line, flush=True)
            result.text += "\n" + line
            with open(os.path.join(self.run_dir, "search.json"), "w") as f:
                json.dump(self._json(result), f, indent=1)
        return result

    def finetune(self, r: SearchResult) -> dict[str, Any]:
        from dqt.train.trainer import train

        c = self.cfg
        tcfg = TrainConfig(model=c.model, data=c.data, optim=c.optim, qat=typed_qat(r.qat),
                           precision=c.precision, logger=c.logger, backend=c.backend,
                           checkpoint=CheckpointConfig(init_from=self.ckpt), seed=c.seed,
                           steps=c.steps, grad_accum=c.grad_accum, eval_every=c.eval_every,
                           log_every=c.log_every, deterministic=c.deterministic)
        out = os.path.join(self.run_dir, "finetune")
        res = train(tcfg, out)
        return {"eval/acc": res.metrics["eval/acc"], "eval/loss": res.metrics["eval/loss"],
                "steps": res.step, "run_dir": out}

    # ------------------------------------------------------------------ output
    def _header(self, r: SearchResult) -> str:
        s, sel = self.cfg.search, r.selection
        chosen = ", ".join(f"{LABELS[g]} {_b(sel.chosen[g])}" for g in self.groups)
        return (f"Written by launch/search_bits.py on {datetime.date.today()} (Ristretto's bit-width "
                f"search, dqt.quant.search).\ncheckpoint: {self.ckpt}\n"
                f"{s.quantizer}; fp32 eval/acc {r.baseline:.4f}; error margin {s.error_margin:g} "
                f"points\nchosen: {chosen} -> eval/acc {sel.acc:.4f} "
                f"(drop {drop_points(r.baseline, sel.acc):.2f} points, before fine-tuning)")

    def report(self, r: SearchResult, overrides: list[str]) -> str:
        s, sel, base = self.cfg.search, r.selection, r.baseline
        bits_list = sorted(s.bits, reverse=True)
        out = [f"bit-width search (Ristretto): {s.quantizer}, error margin {s.error_margin:g} "
               f"points of eval/acc, {self.n_test} test samples",
               f"checkpoint {self.ckpt}",
               f"fp32 baseline eval/acc {base:.4f}", "",
               "one group quantized at a time, the rest fp32 (eval/acc, change in points):", "",
               "| group | " + " | ".join(f"{b}-bit" for b in bits_list)
               + " | smallest within margin |",
               "|---" * (len(bits_list) + 2) + "|"]
        for g in self.groups:
            cells = []
            for b in bits_list:
                a = r.table[g][b]
                cells.append("n/a" if a is None else f"{a:.4f} ({0.0 - drop_points(base, a):+.2f})")
            out.append(f"| {LABELS[g]} | " + " | ".join(cells) + f" | {_b(sel.individual[g])} |")
        for g, notes in r.notes.items():
            for b, why in notes.items():
                out.append(f"(n/a: {s.quantizer} refuses {b} bits for {LABELS[g]}: {why})")
        out += ["", "combinations (" + " / ".join(LABELS[g] for g in self.groups) + "):", "",
                "| bits | eval/acc | drop (points) | within margin |", "|---|---|---|---|"]
        for bits, acc in sel.trials:
            d = drop_points(base, acc)
            out.append(f"| {' / '.join(_b(bits[g]) for g in self.groups)} | {acc:.4f} | "
                       f"{d:.2f} | {'yes' if d <= s.error_margin + 1e-9 else 'no'} |")
        if sel.stepped_up:
            out.append("(the first combination exceeded the margin: stepped the group with the "
                       "lowest single-group accuracy up one width at a time)")
        out += ["", "chosen: " + ", ".join(f"{LABELS[g]} {_b(sel.chosen[g])}" for g in self.groups)
                + f" -> eval/acc {sel.acc:.4f} (drop {drop_points(base, sel.acc):.2f} <= "
                f"{s.error_margin:g} points)"]
        out += [f"wrote {p}" for p in r.paths]
        run_abs = os.path.abspath(self.run_dir)
        qat_arg = (f"qat={r.name}" if s.write else
                   f"'hydra.searchpath=[file://{run_abs}]' qat={r.name}")
        keep = [o for o in overrides if not o.startswith(("checkpoint=", "search.", "hydra."))]
        out.append("fine-tune: torchrun --standalone --nproc_per_node=2 launch/train.py "
                   + " ".join(shlex.quote(o) for o in keep) + (" " if keep else "")
                   + f"{qat_arg} checkpoint.init_from={self.ckpt}")
        return "\n".join(out)

    def _json(self, r: SearchResult) -> dict[str, Any]:
        sel = r.selection
        return {"checkpoint": self.ckpt, "quantizer": self.cfg.search.quantizer,
                "error_margin": self.cfg.search.error_margin, "baseline": r.baseline,
                "test_samples": self.n_test,
                "table": {g: {str(b): a for b, a in row.items()} for g, row in r.table.items()},
                "not_run": {g: {str(b): w for b, w in n.items()} for g, n in r.notes.items()},
                "individual": sel.individual, "chosen": sel.chosen, "acc": sel.acc,
                "trials": [{"bits": b, "acc": a} for b, a in sel.trials],
                "qat": r.qat, "paths": r.paths, "finetune": r.finetune}


def _b(bits: Bits) -> str:
    return "fp32" if bits is None else str(bits)


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        f.write(text)
    os.replace(path + ".partial", path)


def search_bits(cfg: SearchBitsConfig, run_dir: str,
                train_overrides: Optional[list[str]] = None) -> SearchResult:
    """Validate (every :class:`ConfigError` before any evaluation), then search."""
    os.makedirs(run_dir, exist_ok=True)
    return BitSearch(cfg, run_dir).run(train_overrides)

"""Results of finished runs: a markdown table and loss-vs-step / loss-vs-bytes plots.

Reads ``<run_dir>/metrics.jsonl`` and ``<run_dir>/config.yaml`` (both written by rank 0).
Columns: run, model, data, scheme, qat, ranks, steps, final eval metric, bytes sent per rank per
step, compression ratio vs fp32 all-reduce, median step time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass
class Run:
    path: str
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    @property
    def summary(self) -> dict[str, Any]:
        s = self.of_kind("summary")
        return s[-1] if s else {}


def load_run(path: str) -> Run:
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"{path}: no metrics.jsonl — not a dqt run directory (or the "
                                "run wrote nothing yet)")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    config: dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, "config.yaml")):
        with open(os.path.join(path, "config.yaml")) as f:
            config = yaml.safe_load(f) or {}
    return Run(path, config, records)


def labels(runs: list[Run]) -> list[str]:
    """Each run's shortest path suffix that tells it apart from the others
    (``onebit/seed1`` rather than ``seed1`` when every run directory is a ``seedN``)."""
    parts = [os.path.normpath(r.path).split(os.sep) for r in runs]
    for k in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [r.path for r in runs]


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def results_table(runs: list[Run]) -> str:
    head = ("| run | model | data | scheme | qat | ranks | steps | eval acc | eval loss "
            "| bytes/step/rank | ratio | step ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r, name in zip(runs, labels(runs)):
        s, c = r.summary, r.config
        scheme = (c.get("scheme") or {}).get("name", "allreduce") if c else s.get("scheme", "?")
        lines.append(
            f"| {name} | {c.get('model', {}).get('name', '?')} | {c.get('data', {}).get('name', '?')}"
            f" | {scheme} | {c.get('qat', {}).get('name', s.get('qat', '?'))} | {s.get('world_size', '?')}"
            f" | {s.get('steps', '?')} | {_fmt(s.get('eval/acc'), '.4f')} | {_fmt(s.get('eval/loss'), '.4f')}"
            f" | {_fmt(s.get('comm/bytes_sent_per_step'), ',.0f')} | {_fmt(s.get('comm/ratio'), '.1f')}"
            f" | {_fmt(s.get('time/step_ms_median'), '.1f')} |")
    return "\n".join(lines)


def plot(runs: list[Run], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for x_key, fname, xlabel in (("step", "loss_vs_step.png", "step"),
                                 ("comm/bytes_sent_total", "loss_vs_bytes.png",
                                  "bytes sent per rank (cumulative)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        positive = True
        for r, name in zip(runs, labels(runs)):
            pts = [(rec[x_key], rec["train/loss"]) for rec in r.of_kind("train")
                   if rec.get("train/loss") is not None and rec.get(x_key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=name)
                positive = positive and min(x for x, _ in pts) > 0
        if x_key != "step" and positive:
            ax.set_xscale("log")  # schemes differ by orders of magnitude in bytes
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_link(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """``launch/bench_link.py --json`` rows → one bar chart per model: median step time of every
    scheme at every link rate (log scale), with the compute-only floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        rates = list(dict.fromkeys(r["rate"] for r in rs))
        schemes = list(dict.fromkeys(r["scheme"] for r in rs))
        fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(schemes)), 4.5))
        width = 0.8 / len(rates)
        for i, rate in enumerate(rates):
            ms = {r["scheme"]: r["step_ms"] for r in rs if r["rate"] == rate}
            xs = [j + i * width for j in range(len(schemes))]
            ax.bar(xs, [ms.get(s, 0) for s in schemes], width, label=rate)
        floor = rs[0].get("floor_ms")
        if floor:
            ax.axhline(floor, color="k", linestyle="--", linewidth=1, label="compute only")
        ax.set_xticks([j + width * (len(rates) - 1) / 2 for j in range(len(schemes))])
        ax.set_xticklabels(schemes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("median step time (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{model}: step time per scheme and link rate")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"step_time_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

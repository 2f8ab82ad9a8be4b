"""Quality at equal steps: every scheme against plain fp32 all-reduce, several seeds, real
torchrun runs.

    python -m benchmarks.bench_accuracy                                   # digits, 4 ranks, seeds 1 2 3
    python -m benchmarks.bench_accuracy --nproc 2 --seeds 1 --schemes onebit qsgd4
    python -m benchmarks.bench_accuracy --experiment shakespeare_char --nproc 2 --metric eval/loss \\
        --json out.json                                                   # the transformer matrix

Prints a markdown table: mean ± std over seeds of the final metric (``eval/acc`` in percent, or
``eval/loss`` in nats), the difference to fp32 all-reduce, each seed's value, and bytes sent per
rank per step (from the hooks' counters). Run directories go to
``outputs/bench_accuracy/<experiment>/<scheme>/seed<k>`` (each can be fed to launch/report.py);
``--json`` also writes every run's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# label -> overrides
SCHEMES = {
    "fp32": [],
    "bf16 hook": ["+scheme=bf16"],
    "powersgd": ["+scheme=powersgd"],
    "onebit": ["+scheme=onebit"],
    "onebit two_means": ["+scheme=onebit", "scheme.reconstruction=two_means"],
    "ef_signsgd": ["+scheme=ef_signsgd"],
    "signsgd": ["+scheme=signsgd"],
    "ternary_grad": ["+scheme=ternary_grad"],
    "ternary_grad base3": ["+scheme=ternary_grad", "scheme.format=base3"],
    "qsgd2": ["+scheme=qsgd", "scheme.bits=2"],
    "qsgd4": ["+scheme=qsgd", "scheme.bits=4"],
    "qsgd8": ["+scheme=qsgd", "scheme.bits=8"],
    "fp8": ["+scheme=fp8"],
    "fp8 e5m2": ["+scheme=fp8", "scheme.format=e5m2"],
    "fp8 ef": ["+scheme=fp8", "scheme.error_feedback=true"],
    "onebit_adam": ["optim=onebit_adam"],
    "onebit_adam ternary": ["optim=onebit_adam", "+scheme=ternary_grad"],
    # the control: no codec, Adam's variance frozen as under one (an uncompressed warm-up that
    # never ends; the freeze alone changes the loss)
    "fp32, frozen v": ["+scheme=qsgd", "scheme.warmup_steps=1000000000"],
    # the codecs as they ran before the variance froze (Adam's variance sees the codec's noise)
    "onebit, adaptive v": ["+scheme=onebit", "optim.freeze_variance=false"],
    "ternary_grad, adaptive v": ["+scheme=ternary_grad", "optim.freeze_variance=false"],
    "qsgd4 blocks 2048, adaptive v": ["+scheme=qsgd", "scheme.block_size=2048",
                                      "optim.freeze_variance=false"],
}
DIGITS = ["fp32", "onebit", "ternary_grad", "qsgd4", "ef_signsgd", "signsgd"]


def run(experiment: str | None, label: str, seed: int, nproc: int, extra: list[str],
        out_root: str) -> dict:
    run_dir = os.path.join(out_root, experiment or "default", re.sub(r"[^\w.-]+", "_", label),
                           f"seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: an old one would be resumed
    exp = [f"experiment={experiment}"] if experiment else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "launch", "train.py"), *exp,
           *SCHEMES[label], f"seed={seed}", f"hydra.run.dir={run_dir}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{label} seed {seed} failed:\n{p.stderr[-3000:]}")
    return read_run(run_dir)


def read_run(run_dir: str) -> dict:
    """The run's summary, with the compression ratio of its last logged step (after any
    uncompressed warm-up) as ``comm/ratio_last_step``."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    summary = [r for r in rows if r["kind"] == "summary"][-1]
    train = [r for r in rows if r["kind"] == "train"]
    summary["comm/ratio_last_step"] = train[-1].get("comm/ratio", 1.0) if train else None
    return summary


def table(rows: dict[str, list[dict]], metric: str) -> str:
    scale, unit = (100.0, " pt") if metric == "eval/acc" else (1.0, "")
    base = rows.get("fp32")
    base_mean = statistics.mean(r[metric] for r in base) if base else None
    out = [f"| scheme | {metric} (mean ± std) | vs fp32 | per seed | bytes/rank/step | ratio | "
           "ratio after warm-up |", "|---|---|---|---|---|---|---|"]
    for label, runs in rows.items():
        vals = [r[metric] for r in runs]
        mean = statistics.mean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        diff = f"{scale * (mean - base_mean):+.3f}{unit}" if base_mean is not None else "—"
        per = ", ".join(f"{scale * v:.4f}" for v in vals)
        last = runs[0].get("comm/ratio_last_step")
        out.append(f"| {label} | {scale * mean:.4f} ± {scale * std:.4f} | {diff} | {per} | "
                   f"{runs[0]['comm/bytes_sent_per_step']:,.0f} | "
                   f"{runs[0].get('comm/ratio') or 1.0:.1f}x | "
                   f"{'—' if last is None else f'{last:.1f}x'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", default=None, help="a conf/experiment preset")
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--schemes", nargs="+", default=None, choices=list(SCHEMES),
                    help="default: every scheme for an experiment, a digits subset without one")
    ap.add_argument("--metric", default="eval/acc", choices=["eval/acc", "eval/loss"])
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_accuracy"))
    ap.add_argument("--json", default=None, help="also write every run's summary here")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run (e.g. steps=300)")
    args = ap.parse_args()
    schemes = args.schemes or (list(SCHEMES) if args.experiment else DIGITS)
    if args.metric == "eval/acc" and "onebit_adam" in schemes and not args.experiment:
        schemes.remove("onebit_adam")  # digits trains with SGD
    rows: dict[str, list[dict]] = {}
    for label in schemes:
        rows[label] = [run(args.experiment, label, s, args.nproc, args.overrides, args.out)
                       for s in args.seeds]
        print(f"{label}: {[r[args.metric] for r in rows[label]]}", file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"experiment": args.experiment, "nproc": args.nproc,
                           "seeds": args.seeds, "overrides": args.overrides, "runs": rows}, f,
                          indent=1)
    print(f"\n{args.nproc} ranks, seeds {args.seeds}, experiment {args.experiment or 'default'} "
          f"{' '.join(args.overrides)}\n")
    print(table(rows, args.metric))


if __name__ == "__main__":
    main()

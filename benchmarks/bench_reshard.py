"""Error-feedback residuals across a change of world size under FSDP2: resharded to their mean
or reset to zero (``checkpoint.reshard_residuals``).

    python -m benchmarks.bench_reshard                         # onebit, digits MLP, seeds 1 2 3
    python -m benchmarks.bench_reshard --scheme ef_signsgd --seeds 1 2

For each seed: train ``--from-ranks`` ranks to ``--switch`` steps with a checkpoint there, then
resume that run directory (copied) on ``--to-ranks`` ranks to ``--steps`` with the residuals
resharded to their mean, and again with them reset; and, as the control, the run that never
changes its number of ranks. Prints the mean training loss of the first ``--window`` steps after
the switch and the final eval loss / accuracy, per variant (mean over seeds and each seed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(run_dir: str, nproc: int, args, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "launch", "train.py"),
           "backend.parallel=fsdp", f"+scheme={args.scheme}", "log_every=1", "eval_every=0",
           f"hydra.run.dir={run_dir}", *args.overrides, *extra]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{run_dir} failed:\n{p.stderr[-3000:]}")


def metrics(run_dir: str, switch: int, window: int) -> dict[str, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    summ = [r for r in rows if r["kind"] == "summary"][-1]
    after = {r["step"]: r["train/loss"] for r in rows if r["kind"] == "train"
             and switch < r["step"] <= switch + window}
    return {"loss_after_switch": statistics.mean(after.values()),
            "eval/loss": summ["eval/loss"], "eval/acc": summ["eval/acc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scheme", default="onebit")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--from-ranks", type=int, default=2)
    ap.add_argument("--to-ranks", type=int, default=4)
    ap.add_argument("--switch", type=int, default=150)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_reshard"))
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {"no change": [], "resharded (mean)": [], "reset (zero)": []}
    for seed in args.seeds:
        base = os.path.join(args.out, f"seed{seed}")
        shutil.rmtree(base, ignore_errors=True)
        seed_args = [f"seed={seed}", f"checkpoint.every={args.switch}", "checkpoint.keep=10"]
        same = os.path.join(base, "same")
        train(same, args.from_ranks, args, *seed_args, f"steps={args.steps}")
        rows["no change"].append(metrics(same, args.switch, args.window))
        first = os.path.join(base, "first")
        train(first, args.from_ranks, args, *seed_args, f"steps={args.switch}")
        for label, flag in (("resharded (mean)", "true"), ("reset (zero)", "false")):
            run = os.path.join(base, flag)
            shutil.copytree(first, run)
            train(run, args.to_ranks, args, *seed_args, f"steps={args.steps}",
                  "checkpoint.allow_world_size_change=true",
                  f"checkpoint.reshard_residuals={flag}")
            rows[label].append(metrics(run, args.switch, args.window))
        print(f"seed {seed}: {json.dumps({k: v[-1] for k, v in rows.items()})}", file=sys.stderr,
              flush=True)
    print(f"\n{args.scheme}, {args.from_ranks} → {args.to_ranks} ranks at step {args.switch} of "
          f"{args.steps}, seeds {args.seeds} {' '.join(args.overrides)}\n")
    print(f"| variant | train loss, steps {args.switch + 1}–{args.switch + args.window} | "
          "final eval loss | final eval acc | eval loss per seed |\n|---|---|---|---|---|")
    for label, rs in rows.items():
        m = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        print(f"| {label} | {m['loss_after_switch']:.4f} | {m['eval/loss']:.4f} | "
              f"{100 * m['eval/acc']:.2f} | " + ", ".join(f"{r['eval/loss']:.4f}" for r in rs)
              + " |")


if __name__ == "__main__":
    main()

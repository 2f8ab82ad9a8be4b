"""Accuracy at equal steps: every scheme vs plain all-reduce, several seeds, real torchrun runs.

    python -m benchmarks.bench_accuracy                          # digits, 4 ranks, seeds 1 2 3
    python -m benchmarks.bench_accuracy --nproc 2 --seeds 1 --schemes onebit qsgd

Prints a markdown table: mean ± std of the final test accuracy over seeds, the difference to
plain all-reduce, and bytes sent per rank per step (from the hooks' counters). Run directories
go to ``outputs/bench_accuracy/<scheme>/seed<k>`` (each can be fed to launch/report.py).
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
# scheme label -> overrides; signSGD's ±1 majority vote needs a small learning rate
SCHEMES = {
    "allreduce": [],
    "onebit": ["+scheme=onebit"],
    "ternary_grad": ["+scheme=ternary_grad"],
    "qsgd bits=4": ["+scheme=qsgd", "scheme.bits=4"],
    "ef_signsgd": ["+scheme=ef_signsgd"],
    "signsgd (lr 0.002)": ["+scheme=signsgd", "optim.lr=0.002"],
}


def run(label: str, seed: int, nproc: int, extra: list[str], out_root: str) -> dict:
    run_dir = os.path.join(out_root, label.split()[0], f"seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: an old one would be resumed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "launch", "train.py"),
           *SCHEMES[label], f"seed={seed}", f"hydra.run.dir={run_dir}", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"summary"' in line][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_accuracy"))
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run (e.g. steps=300)")
    args = ap.parse_args()
    rows = {}
    for label in args.schemes:
        runs = [run(label, s, args.nproc, args.overrides, args.out) for s in args.seeds]
        accs = [r["eval/acc"] for r in runs]
        rows[label] = (accs, runs[0]["comm/bytes_sent_per_step"], runs[0].get("comm/ratio"))
        print(f"{label}: {accs}", file=sys.stderr, flush=True)
    base = statistics.mean(rows["allreduce"][0]) if "allreduce" in rows else None
    print(f"\n{args.nproc} ranks, seeds {args.seeds}, data/model/steps from the default config "
          f"{' '.join(args.overrides)}\n")
    print("| scheme | test acc (mean ± std) | vs all-reduce | per seed | bytes/rank/step | ratio |")
    print("|---|---|---|---|---|---|")
    for label, (accs, nbytes, ratio) in rows.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diff = f"{100 * (mean - base):+.2f} pt" if base is not None else "—"
        per = ", ".join(f"{100 * a:.2f}" for a in accs)
        print(f"| {label} | {100 * mean:.2f} ± {100 * std:.2f} | {diff} | {per} | {nbytes:,.0f} |"
              f" {ratio or 1.0:.1f}x |")


if __name__ == "__main__":
    main()

"""QAT accuracy at equal steps: every preset vs the fp32 baseline, several seeds, real torchrun
runs (like launch/bench_accuracy.py).

    python launch/bench_qat.py                              # digits CNN, 2 ranks, seeds 1 2 3
    python launch/bench_qat.py --nproc 4 --methods fp32 "DoReFa W2A2 G32"
    python launch/bench_qat.py model=mlp                    # extra overrides for every run

Prints a markdown table: mean ± std of the final test accuracy over seeds, the difference to
fp32, the per-seed values and the packed model size (from the run's QAT summary). Every method
runs the same config (``experiment=digits_cnn``: LeNet CNN, SGD lr 0.05, 300 steps) — only the
``qat`` / ``precision`` group differs. Run directories: ``outputs/bench_qat/<method>/seed<k>``;
a finished one is reused (delete ``outputs/bench_qat`` to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["experiment=digits_cnn"]
METHODS = {
    "fp32": [],
    "W8A8 (int8 w, uint8 a)": ["qat=w8a8"],
    "W4A4 (int4 w, uint4 a)": ["qat=w4a4"],
    "DoReFa W2A2 G32": ["qat=dorefa_w2a2"],
    "DoReFa W2A2 G8": ["qat=dorefa_w2a2_g8"],
    "BNN W1A1": ["qat=bnn"],
    "BWN": ["qat=bwn"],
    "XNOR": ["qat=xnor"],
    "TWN": ["qat=twn"],
    "TTQ": ["qat=ttq"],
    "log2 W4A4 (Miyashita)": ["qat=log2"],
    "pow2 W5 (INQ)": ["qat=pow2"],
    "Flexpoint flex16+5": ["qat=flexpoint"],
    "bf16 mixed precision": ["precision=bf16"],
    "LSQ W4A4": ["qat=lsq_w4a4"],
    "PACT W4A4": ["qat=pact_w4a4"],
}
DEFAULT = [m for m in METHODS if not m.startswith(("LSQ", "PACT"))]  # the list


def run(label: str, seed: int, nproc: int, extra: list[str], out_root: str) -> dict:
    slug = label.split(" (")[0].replace(" ", "_").replace("+", "p")
    run_dir = os.path.join(out_root, slug, f"seed{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics) and '"summary"' in open(metrics).read():  # finished: reuse
        with open(metrics) as f:
            return [json.loads(line) for line in f if '"summary"' in line][-1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "launch", "train.py"),
           *BASE, *METHODS[label], f"seed={seed}", f"hydra.run.dir={run_dir}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{label} seed {seed} failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"summary"' in line][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=DEFAULT, choices=list(METHODS))
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_qat"))
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = ap.parse_args()
    rows = {}
    for label in args.methods:
        runs = [run(label, s, args.nproc, args.overrides, args.out) for s in args.seeds]
        accs = [r["eval/acc"] for r in runs]
        rows[label] = (accs, runs[0].get("qat/packed_bytes"), runs[0].get("qat/compression"),
                       all(r["params_in_sync"] for r in runs))
        print(f"{label}: {accs}", file=sys.stderr, flush=True)
    base = statistics.mean(rows["fp32"][0]) if "fp32" in rows else None
    print(f"\n{args.nproc} ranks (gloo), seeds {args.seeds}, {' '.join(BASE + args.overrides)}"
          " (LeNet CNN on digits, SGD lr 0.05 cosine, 300 steps)\n")
    print("| method | test acc (mean ± std) | vs fp32 | per seed | packed model | vs fp32 size |")
    print("|---|---|---|---|---|---|")
    for label, (accs, nbytes, ratio, in_sync) in rows.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diff = f"{100 * (mean - base):+.2f} pt" if base is not None else "—"
        per = ", ".join(f"{100 * a:.2f}" for a in accs)
        size = f"{nbytes / 1000:.1f} KB" if nbytes else "—"
        print(f"| {label} | {100 * mean:.2f} ± {100 * std:.2f} | {diff} | {per} | {size} |"
              f" {f'{ratio:.1f}x' if ratio else '1.0x'} |" + ("" if in_sync else " (ranks diverged)"))


if __name__ == "__main__":
    main()

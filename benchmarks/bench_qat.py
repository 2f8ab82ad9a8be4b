"""QAT accuracy at equal steps: every preset vs the fp32 baseline, several seeds, real torchrun
runs (like benchmarks/bench_accuracy.py).

    python -m benchmarks.bench_qat                              # digits CNN + BN, 2 ranks, seeds 1 2 3
    python -m benchmarks.bench_qat --nproc 4 --methods fp32 "DoReFa W2A2 G32"
    python -m benchmarks.bench_qat --experiment digits_cnn      # the same CNN without BatchNorm
    python -m benchmarks.bench_qat -- steps=600                 # extra overrides for every run
    python -m benchmarks.bench_qat --methods fp32 "LSQ W4A4" "PACT W4A4" "TTQ, W_p/W_n at the weights' lr"
    python -m benchmarks.bench_qat --experiment shakespeare_char --metric eval/loss \
        --methods fp32 "W8A8 per-tensor act" "int8dyn_int4w (torchao)" "BitNet b1.58" "DoReFa W4A4"
    # fine-tuning from an fp32 run (its directory): another --out, so the runs do not mix
    python -m benchmarks.bench_qat --experiment shakespeare_char --metric eval/loss \
        --out outputs/bench_qat_ft --methods ... -- checkpoint.init_from=RUN_DIR steps=300

Prints a markdown table: mean ± std of the final test accuracy (or ``--metric eval/loss``) over seeds, the difference to
fp32, the per-seed values and the packed model size (from the run's QAT summary). Every method
runs the same config (``--experiment``, default ``digits_cnn_bn``: LeNet CNN with BatchNorm after
each conv and the hidden Linear, SGD lr 0.05 cosine, 300 steps, plus the overrides) — only the
``qat`` / ``precision`` group differs (each preset's own knobs, such as TTQ's
``qat.quantizer_lr_mult``, are in its YAML). Run directories:
``<out>/<experiment>/<method>/seed<k>``; a finished one is reused only when its overrides, its
number of ranks and a hash of ``dqt/``, ``conf/`` and ``launch/train.py`` are unchanged;
otherwise its directory is deleted and the run starts from scratch (never resumed). The default methods are the
issue's list; LSQ, PACT and the TTQ ablation (W_p/W_n at the weights' own lr) run on request.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    "TTQ, W_p/W_n at the weights' lr": ["qat=ttq", "qat.quantizer_lr_mult=1"],  # ablation
    "ADMM ternary": ["qat=admm_ternary"],
    "Balanced W2": ["qat=balanced_w2"],
    "HWGQ (BWN + HWGQ A2)": ["qat=hwgq"],
    "AQN W2": ["qat=aqn_w2"],
    "Q-CNN PQ (K=16, d=4)": ["qat=qcnn"],  # second tier of the survey
    "Q-CNN PQ + error correction": ["qat=qcnn_ec"],
    "BWNH": ["qat=bwnh"],
    "FFN (ternary SDD)": ["qat=ffn"],
    "TNN (ternary W + A)": ["qat=tnn"],
    "WAGE 2-8-8-8": ["qat=wage"],
    "Deep Compression k-means W4": ["qat=kmeans"],
    "Deep Compression k-means W2": ["qat=kmeans", "qat.default.weight.bits=2"],
    "INQ W5 (staged pow2)": ["qat=inq"],
    "ShiftCNN N2 B4": ["qat=shiftcnn"],
    "SLQ W4 (staged k-means, loss-based)": ["qat=slq"],
    "MLQ W4 (SLQ layer by layer)": ["qat=mlq"],
    "EBP binary (sign of h)": ["qat=ebp"],
    "EBP binary, gain 1": ["qat=ebp", "qat.default.weight.gain=1"],
    # transformer recipes (experiment=shakespeare_char)
    "W8A8 per-tensor act": ["qat=w8a8"],
    "int8dyn_int4w (torchao)": ["qat=int8dyn_int4w"],
    "BitNet b1.58": ["qat=bitnet_b158"],
    "DoReFa W4A4": ["qat=dorefa_w2a2", "qat.default.weight.bits=4", "qat.default.act.bits=4",
                    "qat.default.weight.rescale=true"],
}
SEED_A = ("Deep Compression k-means W4", "Deep Compression k-means W2", "INQ W5 (staged pow2)",
          "ShiftCNN N2 B4")
SEED_B = ("ADMM ternary", "Balanced W2", "HWGQ (BWN + HWGQ A2)", "AQN W2")
SEED_C = ("Q-CNN PQ (K=16, d=4)", "Q-CNN PQ + error correction", "BWNH", "FFN (ternary SDD)",
          "TNN (ternary W + A)", "WAGE 2-8-8-8")
SEED_D = ("SLQ W4 (staged k-means, loss-based)", "MLQ W4 (SLQ layer by layer)",
          "EBP binary (sign of h)", "EBP binary, gain 1")
TRANSFORMER = ("W8A8 per-tensor act", "int8dyn_int4w (torchao)", "BitNet b1.58", "DoReFa W4A4")
EXTRA = ("LSQ W4A4", "PACT W4A4", "TTQ, W_p/W_n at the weights' lr", *SEED_A, *SEED_B,
         *SEED_C, *SEED_D, *TRANSFORMER)
DEFAULT = [m for m in METHODS if m not in EXTRA]  # the list


def code_hash() -> str:
    """sha256 over the sources and configs a run depends on (a changed preset reruns)."""
    h = hashlib.sha256()
    paths = [os.path.join(ROOT, "launch", "train.py")]
    for top in ("dqt", "conf"):
        paths += sorted(p for p in glob.glob(os.path.join(ROOT, top, "**", "*"), recursive=True)
                        if p.endswith((".py", ".yaml", ".c")))
    for p in paths:
        h.update(os.path.relpath(p, ROOT).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def run(label: str, seed: int, nproc: int, base: list[str], out_root: str, code: str) -> dict:
    slug = label.split(" (")[0].replace(",", "").replace("'", "").replace("/", "")
    slug = slug.replace(" ", "_").replace("+", "p")
    run_dir = os.path.join(out_root, slug, f"seed{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    overrides = [*base, *METHODS[label], f"seed={seed}", f"hydra.run.dir={run_dir}"]
    record = os.path.join(run_dir, "bench_overrides.json")
    if os.path.isfile(record) and os.path.isfile(metrics):  # finished with the same overrides
        with open(record) as f:
            same = json.load(f) == {"nproc": nproc, "overrides": overrides, "code": code}
        if same and '"summary"' in open(metrics).read():
            with open(metrics) as f:
                return [json.loads(line) for line in f if '"summary"' in line][-1]
    if os.path.isdir(run_dir):  # stale or unfinished: start over (the trainer would resume it)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "launch", "train.py"), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{label} seed {seed} failed:\n{p.stderr[-3000:]}")
    with open(record, "w") as f:
        json.dump({"nproc": nproc, "overrides": overrides, "code": code}, f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"summary"' in line][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--methods", nargs="+", default=DEFAULT, choices=list(METHODS))
    ap.add_argument("--experiment", default="digits_cnn_bn",
                    help="the experiment preset every method runs (conf/experiment)")
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_qat"))
    ap.add_argument("--metric", default="eval/acc", choices=["eval/acc", "eval/loss"],
                    help="eval/acc: percent; eval/loss: nats (lower is better)")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = ap.parse_args()
    base = [f"experiment={args.experiment}", *args.overrides]
    out_root = os.path.join(args.out, args.experiment)
    code = code_hash()
    rows = {}
    for label in args.methods:
        runs = [run(label, s, args.nproc, base, out_root, code) for s in args.seeds]
        accs = [r[args.metric] for r in runs]
        rows[label] = (accs, runs[0].get("qat/packed_bytes"), runs[0].get("qat/compression"),
                       all(r["params_in_sync"] for r in runs))
        print(f"{label}: {accs}", file=sys.stderr, flush=True)
    ref = statistics.mean(rows["fp32"][0]) if "fp32" in rows else None
    print(f"\n{args.nproc} ranks (gloo), seeds {args.seeds}, {' '.join(base)}\n")
    loss = args.metric == "eval/loss"
    head = "eval loss, nats" if loss else "test acc"
    print(f"| method | {head} (mean ± std) | vs fp32 | per seed | packed model | vs fp32 size |")
    print("|---|---|---|---|---|---|")
    fmt = (lambda v: f"{v:.4f}") if loss else (lambda v: f"{100 * v:.2f}")
    for label, (accs, nbytes, ratio, in_sync) in rows.items():
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diff = "—" if ref is None else (f"{mean - ref:+.4f}" if loss else
                                        f"{100 * (mean - ref):+.2f} pt")
        per = ", ".join(fmt(a) for a in accs)
        size = f"{nbytes / 1000:.1f} KB" if nbytes else "—"
        print(f"| {label} | {fmt(mean)} ± {fmt(std)} | {diff} | {per} | {size} |"
              f" {f'{ratio:.1f}x' if ratio else '1.0x'} |" + ("" if in_sync else " (ranks diverged)"))


if __name__ == "__main__":
    main()

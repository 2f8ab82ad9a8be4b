"""Time-to-accuracy study: every scheme × {fp32, one QAT setting} × seeds, on real ranks over a
shaped link.

    sudo python -m benchmarks.study                                  # the full study, 1 Gbit/s link
    python -m benchmarks.study --no-link --models mlp --seeds 1      # loopback torchrun, no root

For each model (digits MLP, digits CNN, the character GPT on the text corpus), scheme and QAT
setting it trains ``--seeds`` runs of the real ``launch/train.py`` (ranks in network namespaces
joined by a ``--rate`` link, see ``benchmarks/linklab.py``; or torchrun over loopback with
``--no-link``), evaluating every ``eval_every`` steps, and reports the final metric (mean ±
std over seeds) and, against a fixed target per model, the steps, the bytes one rank sent, and
the wall time from the first step until the target was first met (mean over the seeds that
met it). Rows are written as markdown to stdout and as JSON (``--json``); run directories go
under ``--out`` and feed ``launch/report.py`` for the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
from benchmarks.linklab import LinkLab, check_root

# model -> (overrides, target metric, target value, higher is better); target "fp32": the mean
# final metric of the same study's fp32 all-reduce runs (include the "allreduce" scheme)
MODELS = {
    "mlp": (["model=mlp", "data=digits", "steps=300", "eval_every=25"], "eval/acc", 0.95, True),
    "cnn": (["experiment=digits_cnn", "eval_every=25"], "eval/acc", 0.97, True),
    "gpt": (["experiment=gpt_text", "steps=300", "eval_every=25", "data.max_chars=300000"],
            "eval/loss", 2.0, False),
    "shakespeare": (["experiment=shakespeare_char", "eval_every=50"], "eval/loss", "fp32", False),
}
SCHEMES = {
    "allreduce": [],
    "bf16": ["+scheme=bf16"],
    "powersgd r1": ["+scheme=powersgd", "scheme.matrix_approximation_rank=1"],
    "powersgd r4": ["+scheme=powersgd", "scheme.matrix_approximation_rank=4"],
    "onebit": ["+scheme=onebit"],
    "ternary_grad": ["+scheme=ternary_grad"],
    "qsgd bits=4": ["+scheme=qsgd", "scheme.bits=4"],
    "ef_signsgd": ["+scheme=ef_signsgd"],
    "signsgd": ["+scheme=signsgd", "optim.lr=0.002"],
    "onebit_adam": ["optim=onebit_adam"],
}


def _env(run_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC",
                                "SLURM_", "DQT_RUN_DIR", "GLOO_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               DQT_RUN_DIR=run_dir)
    return env


def train(lab: LinkLab | None, nranks: int, overrides: list[str], run_dir: str) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: an old one would be resumed
    os.makedirs(run_dir)
    script = os.path.join(ROOT, "launch", "train.py")
    args = [*overrides, "log_every=1", f"hydra.run.dir={run_dir}"]
    if lab is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nranks}", script, *args]
        rc = subprocess.run(cmd, env=_env(run_dir), cwd=ROOT, capture_output=True).returncode
    else:
        procs = lab.launch([sys.executable, script, *args], _env(run_dir), log_dir=run_dir,
                           port=29500 + int(time.time() * 7) % 1000)
        rc = max(p.wait() for p in procs)
    if rc != 0:
        raise RuntimeError(f"a rank failed (exit {rc}); see {run_dir}")


def final_metric(run_dir: str, metric: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"summary"' in line][-1][metric]


def to_target(run_dir: str, metric: str, target: float, higher: bool) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = {r["step"]: r for r in rows if r["kind"] == "train"}
    first = train_rows[min(train_rows)]
    t0 = first["time"] - first["time/step_ms"] / 1e3
    final = [r for r in rows if r["kind"] == "summary"][-1]
    out = {"final": final[metric], "steps": None, "bytes": None, "seconds": None,
           "bytes_per_step": final["comm/bytes_sent_per_step"]}
    for r in rows:
        if r["kind"] == "eval" and (r[metric] >= target if higher else r[metric] <= target):
            step = train_rows[r["step"]]
            out.update(steps=r["step"], bytes=step["comm/bytes_sent_total"],
                       seconds=r["time"] - t0)
            break
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def table(results: dict, args) -> str:
    lines = []
    for model in args.models:
        metric, target, higher = MODELS[model][1:]
        target = args.targets.get(model, target)
        base = results.get((model, "allreduce", "fp32"))
        shown = "—" if target is None else (f"{target:.4f} (fp32 all-reduce's mean final)"
                                             if model in args.targets else target)
        lines += [f"\n### {model}: target {metric} {'≥' if higher else '≤'} {shown}\n",
                  f"| scheme | qat | final {metric} (mean ± std) | reached | steps to target | "
                  "MB sent to target | s to target | vs all-reduce (time) |",
                  "|---|---|---|---|---|---|---|---|"]
        for (m, scheme, qat), runs in results.items():
            if m != model:
                continue
            finals = [r["final"] for r in runs if r["final"] is not None]
            if not finals:
                lines.append(f"| {scheme} | {qat} | failed ({len(runs)} runs; see run_dir) "
                             "| 0 | — | — | — | — |")
                continue
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            hit = [r for r in runs if r["steps"] is not None]
            secs = _mean([r["seconds"] for r in hit])
            base_s = _mean([r["seconds"] for r in base if r["steps"] is not None]) if base else None
            speed = f"{base_s / secs:.2f}x" if secs and base_s else "—"
            mb = _mean([r["bytes"] for r in hit])
            lines.append(
                f"| {scheme} | {qat} | {statistics.mean(finals):.4f} ± {sd:.4f} | "
                f"{len(hit)}/{len(runs)} | {_fmt(_mean([r['steps'] for r in hit]), '.0f')} | "
                f"{_fmt(mb / 1e6 if mb is not None else None, '.1f')} | {_fmt(secs, '.1f')} | "
                f"{speed} |")
    return "\n".join(lines)


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--qat", nargs="+", default=["fp32", "w8a8"],
                    help="'fp32' (no QAT) and/or conf/qat presets")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--nranks", type=int, default=2)
    ap.add_argument("--rate", default="1gbit", help="link rate (needs root)")
    ap.add_argument("--no-link", action="store_true", help="torchrun over loopback, no root")
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "study"))
    ap.add_argument("--json", help="also write the per-run results as JSON here")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="overrides added to every run, after the model's (e.g. steps=100)")
    args = ap.parse_args()
    args.targets = {}
    if not args.no_link and (reason := check_root()):
        sys.exit(f"study: {reason} (or pass --no-link)")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    lab = None if args.no_link else LinkLab(args.nranks).open()
    results: dict[tuple[str, str, str], list[dict]] = {}
    try:
        if lab is not None:
            lab.shape(args.rate)
        for model in args.models:
            overrides, metric, target, higher = MODELS[model]
            for qat in args.qat:
                for scheme in args.schemes:
                    for seed in args.seeds:
                        run_dir = os.path.join(args.out, model, qat,
                                               re.sub(r"[^\w.-]+", "_", scheme), f"seed{seed}")
                        extra = [] if qat == "fp32" else [f"qat={qat}"]
                        try:
                            train(lab, args.nranks, [*overrides, *SCHEMES[scheme], *extra,
                                                     f"seed={seed}", *args.extra], run_dir)
                            r = {"run_dir": run_dir, "final": final_metric(run_dir, metric)}
                        except RuntimeError as e:  # reported in the table, the study goes on
                            r = {"final": None, "steps": None, "bytes": None, "seconds": None,
                                 "run_dir": run_dir, "error": str(e)}
                        results.setdefault((model, scheme, qat), []).append(r)
                        print(json.dumps({"model": model, "scheme": scheme, "qat": qat,
                                          "seed": seed, **r}), file=sys.stderr, flush=True)
    finally:
        if lab is not None:
            lab.close()
    for (model, scheme, qat), runs in results.items():  # time to target, once targets are known
        metric, target, higher = MODELS[model][1:]
        if target == "fp32":  # the mean final metric of this study's fp32 all-reduce runs
            base = [r["final"] for r in results.get((model, "allreduce", "fp32"), [])
                    if r["final"] is not None]
            target = args.targets.setdefault(model, statistics.mean(base) if base else None)
        for r in runs:
            if r["final"] is not None and target is not None:
                r.update(to_target(r["run_dir"], metric, target, higher))
            r.setdefault("steps", None), r.setdefault("bytes", None), r.setdefault("seconds", None)
    link = "loopback (torchrun)" if args.no_link else f"a {args.rate} link (network namespaces)"
    print(f"{args.nranks} ranks over {link}, seeds {args.seeds}, {time.strftime('%Y-%m-%d')}")
    print(table(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"model": k[0], "scheme": k[1], "qat": k[2], "runs": v}
                       for k, v in results.items()], f, indent=1)


if __name__ == "__main__":
    main()

"""End-to-end step time over a real, bandwidth-limited link: every scheme, on real processes.

    sudo python -m benchmarks.bench_link                                  # 2 ranks, 1 Gbit/s, 20M MLP
    sudo python -m benchmarks.bench_link --rates 100mbit 1gbit 10gbit unshaped --models mlp_20m resnet20 gpt
    python -m benchmarks.bench_link --unshaped-only                       # no root: loopback torchrun

Each rank runs the real ``launch/train.py`` in a network namespace of its own, joined to the
others through veth links shaped with ``tc … tbf`` (``benchmarks/linklab.py``), on gloo with
``GLOO_SOCKET_IFNAME`` set to the shaped interface. For each (model, link rate, scheme) it
reports the median step time after ``--warmup`` steps (the trainer's ``time/step_ms``:
data, forward, backward with the hook's communication, optimizer), the bytes each rank sends
per step as counted by the hook, cross-checked against rank 0's interface tx byte counter
(whole run, minus DDP's one initial broadcast of the model: the ratio is then the protocol
overhead plus the few small collectives outside the hook), and the final accuracy. The ``fsdp``
rows run FSDP2 (``backend.parallel=fsdp``) and are compared with the ``fsdp fp32`` / ``fsdp bf16``
rows; their interface bytes also carry the parameters' all-gathers. The compute-only floor is one
process with the same per-rank batch and no communication. Not a test: the numbers depend on
the machine; compare ratios within one run. ``--repeats N`` runs every scheme N times, round
robin (repeat k of every scheme before repeat k+1 of any, so slow drift of the machine hits all
schemes alike); the table gives the median over the repeats with the min–max spread, and the
speed-ups are ratios of the medians.
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
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
from benchmarks.linklab import LinkLab, check_root

MODELS = {  # name -> overrides (same per-rank batch in every run)
    "mlp_20m": ["model=mlp_20m", "data=synthetic", "optim.lr=0.01"],
    "resnet20": ["model=resnet20", "data=synthetic", "data.input_shape=[3,32,32]",
                 "data.batch_size=32"],
    "gpt": ["model=gpt", "data=text", "data.batch_size=32", "optim.name=adamw",
            "optim.lr=0.001"],
}
SCHEMES = {  # label -> overrides
    "fp32 all-reduce": [],
    "bf16 (torch hook)": ["+scheme=bf16"],
    "powersgd rank 1": ["+scheme=powersgd", "scheme.matrix_approximation_rank=1",
                        "scheme.start_powerSGD_iter=2"],
    "powersgd rank 4": ["+scheme=powersgd", "scheme.matrix_approximation_rank=4",
                        "scheme.start_powerSGD_iter=2"],
    "onebit": ["+scheme=onebit"],
    "ternary_grad": ["+scheme=ternary_grad"],
    "ternary_grad base3": ["+scheme=ternary_grad", "scheme.format=base3"],
    "qsgd bits=4": ["+scheme=qsgd", "scheme.bits=4"],
    "fp8": ["+scheme=fp8"],
    "signsgd": ["+scheme=signsgd", "optim.lr=0.0005"],
    "ef_signsgd": ["+scheme=ef_signsgd"],
    # scheme.auto: per bucket, the faster of onebit and the plain fp32 all-reduce (timed trials)
    "onebit auto": ["+scheme=onebit", "scheme.auto=true"],
    # the hook's whole exchange inline (no communication thread): the overlap's baseline
    "onebit inline": ["+scheme=onebit", "scheme.overlap=false"],
    "ternary_grad inline": ["+scheme=ternary_grad", "scheme.overlap=false"],
    "qsgd bits=4 inline": ["+scheme=qsgd", "scheme.bits=4", "scheme.overlap=false"],
    # FSDP2 (fully_shard): the codecs in the gradient reduce-scatter; the parameters'
    # all-gathers (forward and backward) stay fp32. Compared with the FSDP rows' own baselines.
    "fsdp fp32": ["backend.parallel=fsdp"],
    "fsdp bf16": ["backend.parallel=fsdp", "+scheme=bf16"],
    "fsdp onebit": ["backend.parallel=fsdp", "+scheme=onebit"],
    "fsdp ternary_grad": ["backend.parallel=fsdp", "+scheme=ternary_grad"],
    "fsdp qsgd bits=4": ["backend.parallel=fsdp", "+scheme=qsgd", "scheme.bits=4"],
    # the parameters' all-gathers in bf16 too (backend.fsdp_gather)
    "fsdp bf16 + bf16 gather": ["backend.parallel=fsdp", "+scheme=bf16", "backend.fsdp_gather=bf16"],
    "fsdp onebit + bf16 gather": ["backend.parallel=fsdp", "+scheme=onebit",
                                  "backend.fsdp_gather=bf16"],
}
FSDP = "fsdp "  # the label prefix of the FSDP rows


def _baselines(label: str) -> tuple[str, str]:
    """The (fp32, 16-bit) rows a row's speed-ups are measured against: DDP's or FSDP's."""
    if label.startswith(FSDP):
        return "fsdp fp32", "fsdp bf16"
    return "fp32 all-reduce", "bf16 (torch hook)"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC",
                                "SLURM_", "DQT_RUN_DIR", "GLOO_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _common(args) -> list[str]:
    return [f"steps={args.steps}", "log_every=1", "eval_every=0", "checkpoint.every=0",
            f"seed={args.seed}", *args.extra]


def _summary(run_dir: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["kind"] == "summary"][-1], [r for r in rows if r["kind"] == "train"]


def _median_step(train_rows: list[dict], warmup: int) -> float:
    times = [r["time/step_ms"] for r in train_rows if r["step"] > warmup]
    return statistics.median(times)


PROFILE = {"forward": "time/forward_ms", "backward (incl. hook)": "time/backward_ms",
           "optimizer": "time/optim_ms", "hook": "time/hook_ms", "compress": "time/compress_ms",
           "wire": "time/communicate_ms", "decompress": "time/decompress_ms"}


def profile(run_dir: str, warmup: int) -> dict[str, float]:
    """Median per-step times after warm-up (rank 0): where the step goes. ``hook`` is the time
    the DDP hooks spend on the main thread; compress / wire / decompress are dqt's own
    counters (absent for the torch hooks)."""
    rows = [r for r in _summary(run_dir)[1] if r["step"] > warmup]
    return {name: statistics.median(r[key] for r in rows)
            for name, key in PROFILE.items() if key in rows[0]}


def profile_table(rows: list[dict]) -> str:
    out = ["| model | rate | scheme | step | " + " | ".join(PROFILE) + " |",
           "|---|---|---|---|" + "---|" * len(PROFILE)]
    for r in rows:
        p = r.get("profile", {})
        out.append(f"| {r['model']} | {r['rate']} | {r['scheme']} | {r['step_ms']:.0f} | "
                   + " | ".join(f"{p[k]:.0f}" if k in p else "—" for k in PROFILE) + " |")
    return "\n".join(out)


def compute_floor(model: str, args, out: str) -> float:
    """One process, same per-rank batch, no communication."""
    run_dir = os.path.join(out, model, "compute_only")
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(_env(), DQT_RUN_DIR=run_dir)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), *MODELS[model],
           *_common(args), f"hydra.run.dir={run_dir}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=ROOT)
    return _median_step(_summary(run_dir)[1], args.warmup)


def run_over_link(lab: LinkLab | None, model: str, label: str, args, out: str,
                  repeat: int = 0) -> dict:
    rate = lab.rate if lab else "loopback"
    run_dir = os.path.join(out, model, (rate or "unshaped"), re.sub(r"[^\w.-]+", "_", label)
                           + (f"_r{repeat}" if repeat else ""))
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    overrides = [*MODELS[model], *_common(args), *SCHEMES[label], f"hydra.run.dir={run_dir}"]
    env = dict(_env(), DQT_RUN_DIR=run_dir)
    train = os.path.join(ROOT, "launch", "train.py")
    t0 = time.time()
    if lab is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nranks}", train, *overrides]
        rc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True).returncode
        tx = None
    else:
        tx0 = lab.tx_bytes(0)
        procs = lab.launch([sys.executable, train, *overrides], env, log_dir=run_dir,
                           port=29500 + int(time.time()) % 1000)
        rc = max(p.wait() for p in procs)
        tx = lab.tx_bytes(0) - tx0
    if rc != 0:
        raise RuntimeError(f"{model} {rate} {label}: a rank failed (exit {rc}); see {run_dir}")
    summ, train_rows = _summary(run_dir)
    last = train_rows[-1]
    return {"model": model, "rate": rate or "unshaped", "scheme": label,
            "step_ms": _median_step(train_rows, args.warmup),
            "bytes_step": last.get("comm/bytes_sent", 0),
            "hook_total": summ["comm/bytes_sent_total"], "iface_total": tx,
            "model_bytes": 4 * summ["model/params"],
            "acc": summ.get("eval/acc"), "loss": summ.get("eval/loss"),
            "in_sync": summ.get("params_in_sync"), "wall_s": time.time() - t0,
            "profile": profile(run_dir, args.warmup)}


def merge_repeats(runs: list[dict]) -> list[dict]:
    """One row per (model, rate, scheme): the median step time over its repeats
    (``step_ms``), every repeat's (``step_ms_runs``) and the median profile; the rest from the
    first repeat."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["rate"], r["scheme"]), []).append(r)
    rows = []
    for rs in groups.values():
        row = dict(rs[0], step_ms_runs=[r["step_ms"] for r in rs],
                   step_ms=statistics.median(r["step_ms"] for r in rs))
        row["profile"] = {k: statistics.median(r["profile"][k] for r in rs)
                          for k in rs[0]["profile"] if all(k in r["profile"] for r in rs)}
        row["in_sync"] = all(r["in_sync"] for r in rs)
        rows.append(row)
    return rows


def _spread(r: dict) -> str:
    runs = r.get("step_ms_runs", [r["step_ms"]])
    return f"{min(runs):.0f}–{max(runs):.0f} ({len(runs)})" if len(runs) > 1 else "—"


def table(rows: list[dict], floors: dict[str, float]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for rate in dict.fromkeys(r["rate"] for r in rows if r["model"] == model):
            rs = [r for r in rows if r["model"] == model and r["rate"] == rate]
            base = {r["scheme"]: r["step_ms"] for r in rs}
            out += [f"\n### {model}, {rate}, compute-only floor {floors[model]:.0f} ms/step\n",
                    "| scheme | step ms (median) | spread (min–max, runs) | vs fp32 | vs bf16 | "
                    "vs floor | bytes/rank/step | (iface − model)/hook bytes | final acc | "
                    "params in sync |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for r in rs:
                fp32, bf16 = (base.get(b) for b in _baselines(r["scheme"]))
                # rank 0's interface also carried DDP's initial broadcast of the model (once);
                # under FSDP it carries the parameters' all-gathers too (not the hook's)
                iface = (f"{(r['iface_total'] - r['model_bytes']) / r['hook_total']:.3f}"
                         if r["iface_total"] and r["hook_total"] else "—")
                out.append(
                    f"| {r['scheme']} | {r['step_ms']:.0f} | {_spread(r)} | "
                    + (f"{fp32 / r['step_ms']:.2f}x | " if fp32 else "— | ")
                    + (f"{bf16 / r['step_ms']:.2f}x" if bf16 else "—")
                    + f" | {r['step_ms'] / floors[model]:.2f}x | {r['bytes_step']:,.0f} | {iface} | "
                    f"{r['acc']:.4f} | {r['in_sync']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["1gbit"],
                    help="link rates (100mbit, 1gbit, 10gbit, ...) and/or 'unshaped'")
    ap.add_argument("--models", nargs="+", default=["mlp_20m"], choices=list(MODELS))
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--nranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every scheme (round robin); the table gives median and spread")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="overrides added to every run, the compute-only floor included")
    ap.add_argument("--unshaped-only", action="store_true",
                    help="no namespaces (no root needed): torchrun over loopback")
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "bench_link"))
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()
    if not args.unshaped_only and (reason := check_root()):
        sys.exit(f"bench_link: {reason}")
    floors = {m: compute_floor(m, args, args.out) for m in args.models}
    rows: list[dict] = []
    # Ctrl-C or SIGTERM: unwind through the lab's context manager (namespaces deleted)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    if args.unshaped_only:
        for model in args.models:
            for k in range(args.repeats):
                for label in args.schemes:
                    rows.append(run_over_link(None, model, label, args, args.out, k))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    else:
        with LinkLab(args.nranks) as lab:
            for rate in args.rates:
                lab.shape(None if rate == "unshaped" else rate)
                for model in args.models:
                    for k in range(args.repeats):
                        for label in args.schemes:
                            rows.append(run_over_link(lab, model, label, args, args.out, k))
                            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rows = merge_repeats(rows)
    header = (f"{args.nranks} ranks (gloo, one per network namespace), {args.steps} steps, median "
              f"after {args.warmup}, {args.repeats} run(s) per scheme, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}")
    print(header + "\n" + table(rows, floors))
    print("\n### Where the step goes (ms, median after warm-up, rank 0)\n\n" + profile_table(rows))
    if args.json:
        for r in rows:
            r["floor_ms"] = floors[r["model"]]
        with open(args.json, "w") as f:
            json.dump({"header": header, "floors": floors, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""The transport of the two-phase exchange on a shaped link: gloo's ``all_to_all_single`` and
``all_gather`` against :func:`dqt.comm.collective.exchange` (the same exchange as
point-to-point sends and receives posted at once), with the bf16 hook's ``all_reduce`` of the
same bytes per rank as the yardstick. 2 ranks in network namespaces (``benchmarks/linklab.py``,
needs root), each size timed ``--reps`` times after a barrier; a row gives the median, the
min–max and the median's rate in Mbit/s of the bytes one rank sends.

    sudo python -m benchmarks.bench_wire --rates 100mbit 1gbit --sizes 2 5 10 20 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

OPS = ("all_reduce bf16", "all_to_all (gloo)", "all_to_all (exchange)", "all_gather (gloo)",
       "all_gather (exchange)")


def _worker(sizes: list[float], reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from dqt.comm.collective import _all_gather_single, exchange

    dist.init_process_group("gloo")
    rank, n_ranks = dist.get_rank(), dist.get_world_size()
    rows = []
    for mb in sizes:
        n = int(mb * 2 ** 20)  # bytes per rank of the whole exchange (both phases' input)
        a, b = torch.zeros(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        own = torch.zeros(n // n_ranks, dtype=torch.uint8)
        half = torch.zeros(n // 2, dtype=torch.bfloat16)
        runs = {"all_reduce bf16": lambda: dist.all_reduce(half),
                "all_to_all (gloo)": lambda: dist.all_to_all_single(b, a),
                "all_to_all (exchange)": lambda: exchange("all_to_all", b, a, None),
                "all_gather (gloo)": lambda: _all_gather_single(b, own),
                "all_gather (exchange)": lambda: exchange("all_gather", b, own, None)}
        for op in OPS:
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                runs[op]()
                times.append(time.perf_counter() - t0)
            # bytes one rank sends: 2(N−1)/N of its n for the ring all-reduce, (N−1)/N else
            sent = n * (2 * (n_ranks - 1) / n_ranks if op.startswith("all_reduce") else
                        (n_ranks - 1) / n_ranks)
            rows.append({"MB": mb, "op": op, "times": times, "sent": sent})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    lines = ["| MiB per rank | collective | median ms | min–max ms | bytes sent/rank | Mbit/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = sorted(r["times"])
        med = t[len(t) // 2]
        lines.append(f"| {r['MB']:g} | {r['op']} | {med * 1e3:.1f} | {t[0] * 1e3:.1f}–"
                     f"{t[-1] * 1e3:.1f} | {int(r['sent']):,} | {r['sent'] * 8 / med / 1e6:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    ap.add_argument("--sizes", nargs="+", type=float, default=[2, 5, 10, 20],
                    help="MiB per rank of the exchange")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.sizes, args.reps, args.worker)
        return
    from benchmarks.linklab import LinkLab, check_root

    reason = check_root()
    if reason:
        sys.exit(f"bench_wire: {reason}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with LinkLab(2) as lab, tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            lab.shape(rate)
            out = os.path.join(tmp, f"{rate}.json")
            cmd = [sys.executable, "-m", "benchmarks.bench_wire", "--worker", out, "--reps",
                   str(args.reps), "--sizes", *map(str, args.sizes)]
            procs = lab.launch(cmd, env, log_dir=tmp)
            if any(p.wait() for p in procs):
                sys.exit(f"bench_wire: a rank failed at {rate}; its log: "
                         + open(os.path.join(tmp, "rank0.out")).read()[-2000:])
            print(f"\n#### {rate}\n\n{table(json.load(open(out)))}", flush=True)


if __name__ == "__main__":
    main()

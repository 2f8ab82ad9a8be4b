"""C-kernel compress+EF throughput measured in thread CPU time, one thread: on a shared
machine wall-clock timings follow the other jobs' load, the CPU time a thread spent far less.
Prints GB/s of fp32 gradient (4·n bytes / the best CPU time) of the C encode with error
feedback for onebit, ternary_grad (2-bit, base-3), qsgd bits=4 and fp8 (e4m3, e5m2) at
their shipped block formats, fp8 also without error feedback (its default), and each one's
ratio to onebit, for a few rounds (the schemes interleaved).

    python -m benchmarks.bench_encode_cputime --n 4M --rounds 3 --reps 7
"""

from __future__ import annotations

import argparse
import time

import torch

from dqt.kernels import blockq
from dqt.kernels.blockq import BlockSpec, linear_table

SPECS = {
    "onebit": BlockSpec("sign_mean", 128, 1, "e8m0"),
    "ternary_grad (2bit)": BlockSpec("ternary", 2048, 2, "fp32"),
    "ternary_grad (base3)": BlockSpec("ternary", 2048, 0, "fp32"),
    "qsgd bits=4": BlockSpec("qsgd", 2048, 4, "fp32", levels=7),
    "fp8 (e4m3)": BlockSpec("fp8_e4m3", 128, 8, "e8m0"),
    "fp8 (e5m2)": BlockSpec("fp8_e5m2", 128, 8, "e8m0"),
    "fp8 (e4m3), no EF": BlockSpec("fp8_e4m3", 128, 8, "e8m0"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", default="4M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    n = int(args.n.upper().rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(args.n[-1].upper(), 1)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.01
    print(f"# C encode with error feedback, {n} values, 1 thread, GB/s by thread CPU time")
    print("| round | " + " | ".join(SPECS) + " | " + " | ".join(f"onebit / {k}" for k in SPECS
                                                            if k != "onebit") + " |")
    print("|---" * (2 * len(SPECS)) + "|")
    for rnd in range(args.rounds):
        gbs = {}
        for name, spec in SPECS.items():
            table, nbytes = linear_table(spec, n)
            msg = torch.empty(nbytes, dtype=torch.uint8)
            e = None if name.endswith("no EF") else res
            blockq.encode(spec, x, table, msg, residual=e, key=1, impl="c")
            best = float("inf")
            for r in range(args.reps):
                t = time.thread_time()
                blockq.encode(spec, x, table, msg, residual=e, key=r, impl="c")
                best = min(best, time.thread_time() - t)
            gbs[name] = 4 * n / best / 1e9
        ratios = [gbs["onebit"] / v for k, v in gbs.items() if k != "onebit"]
        print(f"| {rnd} | " + " | ".join(f"{v:.2f}" for v in gbs.values()) + " | "
              + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()

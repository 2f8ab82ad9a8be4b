"""Latency of integer-only inference (``dqt.quant.export.integer_inference.to_integer``) against
the fp32 model and the fake-quant model, on this machine's CPU. Not a test: numbers depend on
the machine (compare ratios measured in one run).

    python -m benchmarks.bench_integer                 # digits MLP / CNN, a 1024×1024 Linear
    python -m benchmarks.bench_integer --reps 50
    python -m benchmarks.bench_integer --cpu-time      # 1 thread, CPU time: for a shared machine

Models: the digits MLP (64→256→256→10) and CNN (conv 32, conv 64, 128, 10 on 8×8), every
layer quantized (w8a8's int8 per-channel weights and uint8 EMA activations,
``keep_first_last=false``), random init, ranges calibrated on 600 digits; and one 1024×1024
Linear with the same quantizers (fp32 in, fp32 out: quantize, int8 GEMM, dequantize). Each
cell is the median of ``--reps`` timed calls after 3 warm-up calls, under ``torch.no_grad``:
wall-clock with torch's default thread count, or (``--cpu-time``) the calling thread's CPU
time with one intra-op thread, which other jobs on the machine do not inflate. The breakdown
times the pieces of every integer layer at batch 256 against the same fp32 layer, and the
int8 GEMM alone (``torch._int_mm``) against the fp32 GEMM alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn

from dqt.quant import apply_qat, qat_step
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant.export.integer_inference import integer_layers, to_integer
from dqt.train.models import MLP, LeNetCNN


CLOCK = time.perf_counter


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = CLOCK()
        fn()
        times.append(CLOCK() - t)
    return 1e3 * statistics.median(times)


def w8a8_all_layers() -> QATConfig:
    return QATConfig(name="w8a8_all", default=QATSlotsConfig(
        weight=QuantizerConfig(name="int", bits=8), act=QuantizerConfig(name="uint", bits=8)),
        keep_first_last=False, fold_bn=True)


def calibrated(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """(fp32 copy, calibrated fake-quant model)."""
    import copy

    fp32 = copy.deepcopy(model).eval()
    fq = apply_qat(w8a8_all_layers(), model).train()
    for i in range(0, len(x), 100):
        fq(x[i:i + 100])
        qat_step(fq)
    return fp32, fq.eval()


def digits(n: int = 600) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:n], dtype=torch.float32) / 16
    return (x - x.mean()) / x.std()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one intra-op thread, timed with the calling thread's CPU time "
                         "(time.thread_time) instead of wall-clock: robust to other jobs on a "
                         "shared machine")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    unit = "CPU ms (1 thread)" if args.cpu_time else "wall ms"
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"quantized engine {torch.backends.quantized.engine}, median of {args.reps}, "
          f"load average {os.getloadavg()[0]:.1f} at start\n")
    x = digits()
    cases = [("digits MLP", MLP(64, [256, 256], 10), x, (1, 256)),
             ("digits CNN", LeNetCNN((1, 8, 8), [32, 64], 128, 10), x.reshape(-1, 1, 8, 8),
              (1, 256)),
             ("Linear 1024×1024", nn.Sequential(nn.Linear(1024, 1024)), torch.randn(600, 1024),
              (64, 256))]
    print(f"| model | batch | fp32 {unit} | fake-quant {unit} | integer {unit} | "
          "integer / fp32 |")
    print("|---|---|---|---|---|---|")
    models = {}
    for name, model, data, batches in cases:
        fp32, fq = calibrated(model, data)
        gm = to_integer(fq)
        models[name] = (fp32, gm)
        for b in batches:
            xb = data[:b] if b <= len(data) else data.repeat(b // len(data) + 1, 1)[:b]
            with torch.no_grad():
                t32 = median_ms(lambda: fp32(xb), args.reps)
                tfq = median_ms(lambda: fq(xb), args.reps)
                tint = median_ms(lambda: gm(xb), args.reps)
            print(f"| {name} | {b} | {t32:.3f} | {tfq:.3f} | {tint:.3f} | {tint / t32:.2f}× |")
    print("\nWhere an integer layer's time goes (batch 256; im2col: pad + unfold of the int8 "
          "codes; epilogue: + bias, requantization or dequantization, layout):\n")
    print(f"| layer | fp32 layer {unit} | quantize input | im2col | int8 GEMM (_int_mm) | "
          "epilogue | integer layer total |")
    print("|---|---|---|---|---|---|---|")
    for name, model, data, _ in cases:
        fp32, gm = models[name]
        lays = integer_layers(gm)
        seen: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(
            lambda mod, a, n=n: seen.__setitem__(n, a[0])) for n, m in lays.items()]
        fseen: dict[str, torch.Tensor] = {}
        fmods = {n: fp32.get_submodule(n) for n in lays}
        handles += [m.register_forward_pre_hook(
            lambda mod, a, n=n: fseen.__setitem__(n, a[0])) for n, m in fmods.items()]
        xb = data[:256]
        with torch.no_grad():
            gm(xb), fp32(xb)
        for h in handles:
            h.remove()
        for n, lay in lays.items():
            x_in, xf = seen[n], fseen[n]
            with torch.no_grad():
                tf = median_ms(lambda: fmods[n](xf), args.reps)
                q = lay.quantize_input(x_in) if x_in.is_floating_point() else x_in
                tq = median_ms(lambda: lay.quantize_input(x_in), args.reps) \
                    if x_in.is_floating_point() else 0.0
                a, lead = lay.gemm_rows(q)
                a = a.contiguous()
                tcol = median_ms(lambda: lay.gemm_rows(q)[0].contiguous(), args.reps)
                tg = median_ms(lambda: torch._int_mm(a, lay.weight_t), args.reps)
                acc32 = torch._int_mm(a, lay.weight_t)

                def epilogue() -> torch.Tensor:
                    acc = acc32 + lay.offset
                    y = lay.requantize_acc(acc) if lay.out_codes else acc.float() * lay.acc_scale
                    y = y.reshape(*lead, -1)
                    return y.permute(0, 3, 1, 2).contiguous() if lay.conv else y

                te = median_ms(epilogue, args.reps)
                tt = median_ms(lambda: lay(x_in), args.reps)
            print(f"| {name} {n} | {tf:.3f} | {tq:.3f} | {tcol:.3f} | {tg:.3f} | {te:.3f} | "
                  f"{tt:.3f} |")
    print("\nThe GEMM alone, K = N = 1024:\n")
    print(f"| batch | fp32 GEMM {unit} | int8 GEMM (_int_mm) {unit} | int8 GEMM / fp32 GEMM |")
    print("|---|---|---|---|")
    w8 = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8)
    w32 = torch.randn(1024, 1024)
    for b in (64, 256):
        a8 = torch.randint(-128, 128, (b, 1024), dtype=torch.int8)
        a32 = torch.randn(b, 1024)
        with torch.no_grad():
            tg32 = median_ms(lambda: a32 @ w32, args.reps)
            tg8 = median_ms(lambda: torch._int_mm(a8, w8), args.reps)
        print(f"| {b} | {tg32:.3f} | {tg8:.3f} | {tg8 / tg32:.2f}× |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

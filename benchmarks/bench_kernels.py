"""Kernel benchmark: compress / decompress throughput of the wire formats, and the packed
low-bit GEMV/GEMM. Prints markdown tables; not a test (numbers depend on the machine: compare
ratios measured in one run).

    python -m benchmarks.bench_kernels                        # CPU: reference vs fused C vs clone
    python -m benchmarks.bench_kernels --sizes 1M 16M --reps 3
    python -m benchmarks.bench_kernels --schemes onebit "fp8 (e4m3)"    # some rows only
    python -m benchmarks.bench_kernels --gpu --out gpu.md     # + Triton on CUDA (if there is a GPU)

CPU — GB/s of fp32 gradient (4·n bytes / time) for n-value buckets in blocks of the scheme:
  compress   = encode with error feedback: read g and e, write e' and the message
  decompress = decode-and-reduce of 4 peers' messages into one fp32 mean (GB/s of output)
  clone      = ``g.clone()``, the bandwidth roofline of one read + one write
for the eager pure-torch reference and the fused C kernel.

GPU — the same through the Triton kernels, with effective bandwidth (bytes read + written / t)
as a share of the measured ``clone()`` bandwidth; then the packed GEMV (batch 1) against fp16
``torch.nn.functional.linear`` on 4096², 8192² and 14336×4096 weights, and batch 16 / 128 as
TFLOP/s. Timing: ``triton.testing.do_bench`` (median) and CUDA-graph replays; fresh random
inputs; every kernel is checked against its reference before it is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from dqt.comm.compressors import build_compressor
from dqt.kernels import blockq
from dqt.kernels.blockq import linear_table
from tests.cases import bench_variants

VARIANTS = bench_variants()  # label -> (scheme name, config options), from tests/cases.py
PEERS = 4


def _size(s: str) -> int:
    s = s.upper()
    return int(s.rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)


def _label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class Case:
    """One scheme on an n-value bucket: inputs, table, buffers; run(impl) for both directions."""

    def __init__(self, label: str, n: int, device: str) -> None:
        name, opts = VARIANTS[label]
        self.spec = build_compressor(name, **opts).spec
        g = torch.Generator(device=device).manual_seed(n)
        self.g = torch.randn(n, generator=g, device=device)
        self.e0 = torch.randn(n, generator=g, device=device) * 1e-3
        self.e = self.e0.clone()
        self.table, self.nbytes = linear_table(self.spec, n, device)
        self.msg = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        self.out = torch.empty(n, device=device)
        msgs = []
        for p in range(PEERS):
            m = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
            blockq.encode(self.spec, torch.randn(n, generator=g, device=device), self.table, m,
                          key=p)
            msgs.append(m)
        self.peers = torch.cat(msgs)

    def compress(self, impl: str) -> None:
        blockq.encode(self.spec, self.g, self.table, self.msg, self.e, 1.0, 7, impl=impl)

    def decompress(self, impl: str) -> None:
        blockq.decode(self.spec, self.peers, self.table, self.out, npeers=PEERS,
                      peer_stride=self.nbytes, mode="mean", impl=impl)

    def check(self, impl: str, ref: str = "reference") -> str:
        """'yes' if ``impl`` gives the reference's bytes, residual and mean, else what differs."""
        got = []
        for which in (impl, ref):
            self.e.copy_(self.e0)
            self.compress(which)
            self.decompress(which)
            got.append((self.msg.clone(), self.e.clone(), self.out.clone()))
        self.e.copy_(self.e0)
        bad = [what for a, b, what in zip(got[0], got[1], ("message", "residual", "mean"))
               if not torch.equal(a, b)]
        return "yes" if not bad else "NO: " + ", ".join(bad)


def cpu_tables(sizes: list[int], reps: int, ref_max: int) -> str:
    impls = [i for i in blockq.available_impls("cpu") if i in ("c", "reference")]
    lines = [f"## CPU ({torch.get_num_threads()} threads): GB/s of fp32 gradient\n",
             "| scheme | elements | clone | " + " | ".join(
                 f"{i} compress+EF | {i} decompress ({PEERS} peers)" for i in impls) + " |",
             "|---|---|---|" + "---|---|" * len(impls)]
    for label in VARIANTS:
        for n in sizes:
            case = Case(label, n, "cpu")
            if "c" in impls and case.check("c") != "yes":
                raise AssertionError(f"{label}: the C kernel differs from the reference")
            clone = 4 * n / _best(lambda: case.g.clone(), reps) / 1e9
            cells = []
            for impl in impls:
                if impl == "reference" and n > ref_max:
                    cells += ["—", "—"]
                    continue
                r = reps if impl != "reference" else max(1, reps // 2)
                comp = 4 * n / _best(lambda: case.compress(impl), r) / 1e9
                dec = 4 * n / _best(lambda: case.decompress(impl), r) / 1e9
                cells += [f"{comp:.2f}", f"{dec:.2f}"]
            lines.append(f"| {label} | {_label(n)} | {clone:.2f} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- GPU
def _gpu_time(fn, graph: bool = False) -> tuple[float, float]:
    """(do_bench median ms, CUDA-graph replay median ms or nan). Only graph-safe functions
    (no host syncs) may be captured: a failed capture leaves the CUDA RNG unusable."""
    import triton

    t = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    g = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") if graph else float("nan")
    return t, g


def _decode_kernel_times(case: Case) -> dict[str, float]:
    """The decode time of each Triton decode kernel that can take this case — "bytes" (the
    lane-per-code kernel), "words" (1/2/4/8-bit codes on aligned blocks), "trits" (base-3) —
    whichever the default picks: the A/B of them, each checked to give the default's output
    first."""
    from dqt.kernels.blockq import triton_impl as bt

    switches = ("DQT_DECODE_WORDS", "DQT_DECODE_TRITS")
    saved = bt.WORDS_MIN_BLOCK, {k: os.environ.get(k) for k in switches}
    case.decompress("triton")
    default = case.out.clone()
    times = {}
    try:
        for kind in ("bytes", "words", "trits"):
            bt.WORDS_MIN_BLOCK = 0
            os.environ["DQT_DECODE_WORDS"] = "1" if kind == "words" else "0"
            os.environ["DQT_DECODE_TRITS"] = "1" if kind == "trits" else "0"
            if kind == "words" and bt.decode_path(case.spec, case.peers, case.nbytes) != "words":
                continue
            if kind == "trits" and case.spec.code_bits != 0:
                continue
            case.out.fill_(float("nan"))
            case.decompress("triton")
            if not torch.equal(case.out, default):
                raise AssertionError(f"the {kind} decode kernel differs from the default")
            times[kind] = _gpu_time(lambda: case.decompress("triton"))[0]
    finally:
        bt.WORDS_MIN_BLOCK = saved[0]
        for k, v in saved[1].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return times


def _pct(t: float | None, nbytes: int, clone_bw: float) -> str:
    """"µs (% of clone)" of a call moving ``nbytes`` in ``t`` ms, or "—"."""
    return "—" if t is None else f"{1e3 * t:.0f} ({100 * nbytes / t / 1e6 / clone_bw:.0f}%)"


def gpu_comm_tables(sizes: list[int]) -> str:
    lines = ["## GPU wire kernels (Triton): per-call time and bandwidth\n",
             "effective = bytes read + written / time; clone moves 8 bytes per value.\n",
             "| scheme | elements | = reference | clone GB/s | compress+EF µs | compress GB/s "
             f"(eff.) | % of clone | decompress {PEERS} peers µs | decompress GB/s (eff.) | "
             "% of clone | A/B decompress µs (% of clone): byte kernel | word kernel | "
             "trit kernel | torch reference compress µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        x = torch.randn(n, device="cuda")
        t_clone, _ = _gpu_time(lambda: x.clone())
        clone_bw = 8 * n / t_clone / 1e6
        for label in VARIANTS:
            case = Case(label, n, "cuda")
            same = case.check("triton")
            t_c, _ = _gpu_time(lambda: case.compress("triton"))
            t_d, _ = _gpu_time(lambda: case.decompress("triton"))
            ab = _decode_kernel_times(case)
            t_ref = _gpu_time(lambda: case.compress("reference"))[0] if n <= 1 << 24 else float("nan")
            c_bytes = 12 * n + case.nbytes + case.table.numel() * 8
            d_bytes = PEERS * case.nbytes + 4 * n + case.table.numel() * 8
            c_bw, d_bw = c_bytes / t_c / 1e6, d_bytes / t_d / 1e6
            lines.append(f"| {label} | {_label(n)} | {same} | {clone_bw:.0f} | {1e3 * t_c:.0f} | "
                         f"{c_bw:.0f} | {100 * c_bw / clone_bw:.0f}% | {1e3 * t_d:.0f} | "
                         f"{d_bw:.0f} | {100 * d_bw / clone_bw:.0f}% | "
                         + " | ".join(_pct(ab.get(k), d_bytes, clone_bw) for k in ("bytes", "words", "trits"))
                         + f" | {1e3 * t_ref:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
            del case
    return "\n".join(lines)


GEMM_SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096)]  # (N out, K in)
GEMM_FORMATS = {"ternary (2-bit)": (2, 1.0, 3), "int2": (2, 2.0, 4), "binary": (1, 0.5, 2),
                "int4": (4, 8.0, 16)}


def gpu_decode_sweep(n: int, configs: list[tuple[int, int]], dev: str = "cuda") -> str:
    """Decode time (µs) and % of clone per (values per program, warps) of the Triton decode."""
    from dqt.kernels.blockq import triton_impl as bt

    saved = bt.DECODE_TILE, bt.DECODE_WARPS, bt.WORDS_TILE, bt.WORDS_WARPS
    x = torch.randn(n, device=dev)
    t_clone, _ = _gpu_time(lambda: x.clone())
    clone_bw = 8 * n / t_clone / 1e6
    lines = [f"## GPU decode ({PEERS} peers, {_label(n)}): µs (% of clone) per (values per "
             "program, warps)\n",
             "| scheme | " + " | ".join(f"{t}/{w}" for t, w in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for label in VARIANTS:
        case = Case(label, n, dev)
        ref = torch.empty_like(case.out)
        case.decompress("reference")
        ref.copy_(case.out)
        cells = []
        for tile, warps in configs:
            bt.DECODE_TILE, bt.DECODE_WARPS = bt.WORDS_TILE, bt.WORDS_WARPS = tile, warps
            case.out.fill_(float("nan"))
            case.decompress("triton")
            same = torch.equal(case.out, ref)
            t, _ = _gpu_time(lambda: case.decompress("triton"))
            d_bw = (PEERS * case.nbytes + 4 * n + case.table.numel() * 8) / t / 1e6
            cells.append(f"{1e3 * t:.0f} ({100 * d_bw / clone_bw:.0f}%)" + ("" if same else " DIFF"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
        del case
    bt.DECODE_TILE, bt.DECODE_WARPS, bt.WORDS_TILE, bt.WORDS_WARPS = saved
    return "\n".join(lines)


def gpu_launch_floor() -> str:
    """What a batch-1 GEMV cannot go under on this GPU, timed the same way (CUDA-graph replay):
    an empty Triton kernel, and clones of 4 MB and 8 MB (the packed 2-bit weights of 4096×4096
    and 8192×4096) — the latency floor the 4096×4096 target (≈ 3.4 µs) is up against."""
    import triton
    import triton.language as tl

    @triton.jit
    def _empty(p):
        tl.store(p + tl.program_id(0), 0)

    buf = torch.zeros(256, dtype=torch.int32, device="cuda")
    t_empty = _gpu_time(lambda: _empty[(256,)](buf), graph=True)[1]
    cells = [f"empty Triton kernel (256 programs) {1e3 * t_empty:.1f} µs"]
    for mb in (4, 8):
        x = torch.empty(mb << 19, dtype=torch.float16, device="cuda")
        cells.append(f"clone of {mb} MB {1e3 * _gpu_time(lambda: x.clone(), graph=True)[1]:.1f} µs")
    return "Launch floor (CUDA-graph replay): " + "; ".join(cells) + ".\n"


def gpu_gemm_tables(batched: bool = True) -> str:
    import torch.nn.functional as F

    from dqt.kernels.lowbit_gemm import LowBitWeight, lowbit_linear, lowbit_linear_ref

    lines = ["## GPU packed GEMV, batch 1 (fp16 activations) vs fp16 `F.linear`\n",
             "| weight N×K | format | fp16 µs (graph) | packed µs (graph) | speedup (graph) | "
             "fp16 µs | packed µs | speedup | bytes ratio | packed GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    big = ["\n## GPU packed GEMM, batches 16 and 128: TFLOP/s (fp16 activations)\n",
           "| weight N×K | format | M | fp16 TFLOP/s | packed TFLOP/s |", "|---|---|---|---|---|"]
    for n, k in GEMM_SHAPES:
        g = torch.Generator().manual_seed(n + k)
        w16 = (torch.randn(n, k, generator=g) * 0.02).to("cuda", torch.float16)
        for fmt, (bits, zero, high) in GEMM_FORMATS.items():
            codes = torch.randint(0, high, (n, k), generator=g).to(torch.uint8)
            w = LowBitWeight.from_codes(codes, torch.rand(n, generator=g) * 0.01 + 0.001,
                                        torch.full((n,), zero), bits).to("cuda")
            for m in ((1, 16, 128) if batched else (1,)):
                x = torch.randn(m, k, generator=g).to("cuda", torch.float16)
                y = lowbit_linear(x, w)
                ref = lowbit_linear_ref(x.float(), w)
                err = float((y.float() - ref).norm() / ref.norm())
                if not err < 2e-3:
                    print(f"MISMATCH {fmt} {n}x{k} M={m}: relative error {err:.2e}",
                          file=sys.stderr, flush=True)
                    lines.append(f"| {n}×{k} | {fmt} | M={m}: relative error {err:.1e} |")
                    continue
                t16, g16 = _gpu_time(lambda: F.linear(x, w16), graph=m == 1)
                tq, gq = _gpu_time(lambda: lowbit_linear(x, w), graph=m == 1)
                if m == 1:
                    from dqt.kernels import lowbit_gemm_triton as lg

                    cfg = lg._BEST.get((1, n, k, w.bits, x.dtype), "default")
                    print(f"GEMV config {n}x{k} {fmt}: {cfg}", file=sys.stderr, flush=True)
                    ratio = 2 * n * k / w.nbytes()
                    lines.append(f"| {n}×{k} | {fmt} | {1e3 * g16:.1f} | {1e3 * gq:.1f} | "
                                 f"{g16 / gq:.2f}x | {1e3 * t16:.1f} | {1e3 * tq:.1f} | "
                                 f"{t16 / tq:.2f}x | {ratio:.1f}x | {w.nbytes() / tq / 1e6:.0f} |")
                    print(lines[-1], file=sys.stderr, flush=True)
                else:
                    fl = 2 * m * n * k
                    big.append(f"| {n}×{k} | {fmt} | {m} | {fl / t16 / 1e9:.1f} | "
                               f"{fl / tq / 1e9:.1f} |")
                    print(big[-1], file=sys.stderr, flush=True)
    return "\n".join(lines + big)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["1M", "16M", "64M"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reference-up-to", default="16M",
                    help="time the (slow) torch reference only up to this size")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="also the Triton tables (needs CUDA)")
    ap.add_argument("--gpu-sizes", nargs="+", default=["16M", "64M"])
    ap.add_argument("--no-gpu-comm", action="store_true", help="GPU: only the GEMV/GEMM tables")
    ap.add_argument("--gemv-only", action="store_true", help="GPU: skip the batch 16/128 GEMM")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="GPU: also time the decode per (values per program, warps)")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    ap.add_argument("--schemes", nargs="+", choices=list(VARIANTS),
                    help="only these rows (default: every scheme of tests/cases.py's BENCH)")
    args = ap.parse_args()
    for label in [v for v in VARIANTS if args.schemes and v not in args.schemes]:
        del VARIANTS[label]
    torch.set_num_threads(args.threads)
    parts = []
    if not args.no_cpu:
        parts.append(cpu_tables([_size(s) for s in args.sizes], args.reps,
                                _size(args.reference_up_to)))
    if args.gpu:
        if not torch.cuda.is_available():
            parts.append("(no CUDA device: GPU tables skipped)")
        else:
            name = torch.cuda.get_device_name()
            import triton

            parts.append(f"# {name}, torch {torch.__version__}, triton {triton.__version__}, "
                         f"{time.strftime('%Y-%m-%d')}")
            if not args.no_gpu_comm:
                parts.append(gpu_comm_tables([_size(s) for s in args.gpu_sizes]))
            if args.decode_sweep:
                parts.append(gpu_decode_sweep(_size(args.gpu_sizes[0]),
                                              [(2048, 4), (2048, 2), (1024, 2), (4096, 8)]))
            parts.append(gpu_launch_floor())
            parts.append(gpu_gemm_tables(batched=not args.gemv_only))
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""Communication benchmark: bytes on the wire and compress/decompress throughput per scheme.

    python -m benchmarks.bench_comm                      # 16.8M-value bucket, 2 ranks; 1M..64M
    python -m benchmarks.bench_comm --bytes-size 4M --world 4 --sizes 1M 16M

Part 1 — bytes sent per rank per step on a real gloo group (a DDP model holding one bucket of
the given size), counted by the hooks: fp32 all-reduce (DDP's default), PyTorch's bf16 and
PowerSGD (rank 1 and 4) hooks, and every dqt scheme.

Part 2 — CPU throughput in GB/s of fp32 gradient of the fused C kernel and the torch reference
(compress with error feedback; decompress-and-reduce of 4 peers), with ``clone()`` as the
roofline: the CPU table of ``benchmarks/bench_kernels.py``, which also has the GPU tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.bench_kernels import VARIANTS, _size, cpu_tables

# ------------------------------------------------------------------ part 1: bytes via hooks
def _scheme_configs():
    from dqt.comm.config import SCHEME_CONFIGS, BF16Config, PowerSGDConfig

    cfgs = {"fp32 all-reduce": None, "bf16 (torch hook)": BF16Config(),
            "powersgd rank 1": PowerSGDConfig(matrix_approximation_rank=1, start_powerSGD_iter=2),
            "powersgd rank 4": PowerSGDConfig(matrix_approximation_rank=4, start_powerSGD_iter=2)}
    for label, (name, opts) in VARIANTS.items():
        cfgs[label] = SCHEME_CONFIGS[name](**opts)  # the preset, with the variant's options
    return cfgs


def _bytes_worker(rank: int, world: int, store: str, n: int, out: str) -> None:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dqt.comm import build_scheme

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    k = int(n ** 0.5)
    rows = {}
    for label, cfg in _scheme_configs().items():
        torch.manual_seed(0)
        model = DDP(nn.Linear(k, k, bias=False), bucket_cap_mb=4 * n / 2**20 + 1)
        scheme = build_scheme(cfg)
        scheme.attach(model)
        for _ in range(3):  # PowerSGD compresses from its 3rd step (start_powerSGD_iter=2)
            model.zero_grad(set_to_none=True)
            model(torch.randn(4, k)).sum().backward()
            stats = scheme.stats()
        rows[label] = stats["comm/bytes_sent"]
        del model, scheme
    if rank == 0:
        torch.save({"numel": k * k, "rows": rows}, out)
    dist.destroy_process_group()


def bytes_table(n: int, world: int = 2) -> tuple[int, dict[str, int]]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "bytes.pt")
        mp.spawn(_bytes_worker, args=(world, os.path.join(d, "store"), n, out), nprocs=world)
        res = torch.load(out)
    return res["numel"], res["rows"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bytes-size", default="16M", help="bucket size (values)")
    ap.add_argument("--world", type=int, default=2, help="ranks")
    ap.add_argument("--sizes", nargs="+", default=["1M", "16M", "64M"], help="part 2 buckets")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-throughput", action="store_true", help="part 1 only")
    args = ap.parse_args()

    numel, rows = bytes_table(_size(args.bytes_size), args.world)
    base = rows["fp32 all-reduce"]
    print(f"## bytes sent per rank per step: one {numel:,}-element fp32 bucket, "
          f"{args.world} ranks (counted by the hooks)\n")
    print("| scheme | bytes/rank/step | vs fp32 all-reduce | vs bf16 |")
    print("|---|---|---|---|")
    for label, b in rows.items():
        print(f"| {label} | {b:,} | {base / b:.1f}x fewer | {rows['bf16 (torch hook)'] / b:.1f}x fewer |")
    if not args.no_throughput:
        print("\n" + cpu_tables([_size(s) for s in args.sizes], args.reps, _size("16M")))


if __name__ == "__main__":
    main()

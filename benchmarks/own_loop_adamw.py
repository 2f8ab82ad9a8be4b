"""dqt's codecs in a user's own DDP loop with AdamW: a 2-layer ``nn.TransformerEncoder`` learns to
sort 16 tokens of 32 values (token accuracy on held-out sequences), 2 gloo ranks.

    python -m benchmarks.own_loop_adamw                     # every variant, 300 steps, seed 1
    python -m benchmarks.own_loop_adamw --steps 600 --variants ddp frozen --seeds 1 2 3

Nothing from ``dqt.train``: the loop is what a user writes, and the variants are the ways of
wiring a codec into it:

* ``ddp`` — plain DDP and ``torch.optim.AdamW``;
* ``bf16`` — PyTorch's own bf16 compression hook (through dqt's wrapper, which counts bytes),
  the 16-bit baseline;
* ``naive`` — ``build_scheme(TernaryGradConfig()).attach(ddp)`` with ``torch.optim.AdamW``:
  Adam's variance sees the codec's noise;
* ``frozen`` — the same codec with :class:`dqt.optim.FrozenVarianceAdamW`: ``freeze`` steps
  uncompressed (``scheme.warmup_steps``), then the variance is frozen and the codec compresses
  the preconditioned gradient (``scheme.set_preconditioner(opt.preconditioner,
  opt.step_bound)``), what the trainer does under ``optim=adamw``;
* ``onebit_adam`` — :class:`dqt.comm.onebit_adam.OneBitAdam` over the same ternary codec (the
  optimizer communicates; DDP's hook leaves the gradients local).

Prints one markdown row per variant: token accuracy (mean ± std over seeds) and bytes sent per
rank per step after the warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dqt.comm import build_scheme
from dqt.comm.config import BF16Config, TernaryGradConfig
from dqt.comm.onebit_adam import OneBitAdam
from dqt.optim import FrozenVarianceAdamW

VARIANTS = ("ddp", "bf16", "naive", "frozen", "onebit_adam")
SEQ, VOCAB, BATCH, WIDTH = 16, 32, 32, 64


class Sorter(nn.Module):
    """Token + position embeddings → 2 pre-LN ``nn.TransformerEncoderLayer`` → a class per token."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.zeros(SEQ, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, 0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.tok(x) + self.pos))


def batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(VOCAB, (n, SEQ), generator=gen)
    return x, x.sort(dim=1).values


def run(rank: int, world: int, store: str, variant: str, seed: int, steps: int, freeze: int,
        out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(seed)
    model = DDP(Sorter())
    params = model.parameters()
    kw = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    scheme = None
    # wire the variant: the codec, the optimizer
    if variant == "bf16":  # dqt's wrapper of torch's hook (which DDP refuses on CPU unwrapped)
        scheme = build_scheme(BF16Config())
        scheme.attach(model)
    if variant in ("naive", "frozen"):
        scheme = build_scheme(TernaryGradConfig(warmup_steps=freeze if variant == "frozen" else 0))
        scheme.attach(model)
    if variant == "onebit_adam":
        opt = OneBitAdam(params, **kw, freeze_steps=freeze, codec=TernaryGradConfig())
        scheme = opt.comm
        scheme.attach(model)
    elif variant == "frozen":
        opt = FrozenVarianceAdamW(params, **kw, freeze_steps=freeze)
        scheme.set_preconditioner(opt.preconditioner, opt.step_bound)
    else:
        opt = torch.optim.AdamW(params, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    sent = 0
    for step in range(steps):
        # forward, backward (the hook communicates), clip, step
        x, y = batch(gen, BATCH)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if scheme is not None:
            s = scheme.stats()
            if step >= freeze:
                sent += s.get("comm/bytes_sent", 0)
    # evaluate on held-out sequences (the same on every rank)
    with torch.no_grad():
        x, y = batch(torch.Generator().manual_seed(99), 2048)
        acc = float((model.module(x).argmax(-1) == y).float().mean())
    n = sum(p.numel() for p in model.parameters())
    per_step = sent / max(1, steps - freeze) if scheme is not None else \
        4 * n * 2 * (world - 1) / world  # fp32 ring all-reduce, as the meters count it
    if rank == 0:
        torch.save({"acc": acc, "bytes": per_step}, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--freeze", type=int, default=50)
    ap.add_argument("--nproc", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"{args.nproc} ranks (gloo), 2-layer nn.TransformerEncoder sorting {SEQ} tokens of "
          f"{VOCAB}, AdamW lr 1e-3, {args.steps} steps, freeze/warm-up {args.freeze}, "
          f"seeds {args.seeds}\n")
    print("| variant | token acc (mean ± std) | per seed | bytes/rank/step after warm-up |")
    print("|---|---|---|---|")
    for variant in args.variants:
        accs, per = [], 0.0
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "result.pt")
                mp.spawn(run, args=(args.nproc, os.path.join(tmp, "store"), variant, seed,
                                    args.steps, args.freeze, out), nprocs=args.nproc, join=True)
                got = torch.load(out)
            accs.append(100 * got["acc"])
            per = got["bytes"]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {variant} | {statistics.mean(accs):.1f} ± {std:.1f} % | "
              f"{', '.join(f'{a:.1f}' for a in accs)} | {per:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

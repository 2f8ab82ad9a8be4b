"""dqt in your own training loop: compressed gradients, QAT, checkpoint/resume and export.

    torchrun --nproc_per_node=2 examples/own_loop.py --steps 40 --out run
    torchrun --nproc_per_node=2 examples/own_loop.py --steps 40 --out run --resume  # continue

Your model, data and loop; dqt adds four calls: ``quantize_`` (QAT), ``compress`` (the DDP
hook), an optimizer whose variance freezes (codec noise must not enter Adam's variance), and
``save_export`` (the packed model).
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dqt.comm as comm
import dqt.quant as quant
from dqt.optim import FrozenVarianceAdamW

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--out", default="own_loop_run")
ap.add_argument("--resume", action="store_true")
ap.add_argument("--stop-at", type=int, default=None, help="save and stop after this step")
args = ap.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # every rank builds the same model
torch.use_deterministic_algorithms(True)

# your model, made quantization-aware (INT8 weights, UINT8 activations), before DDP
model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 10))
qat = quant.quantize_(model, quant.preset("w8a8"))
ddp = DDP(model)

# compressed all-reduce: ternary gradients after 10 uncompressed steps that estimate Adam's v
freeze = 10
scheme = comm.compress(ddp, comm.TernaryGrad(warmup_steps=freeze))
opt = FrozenVarianceAdamW(qat.param_groups(lr=3e-3), lr=3e-3, weight_decay=0.01,
                          freeze_steps=freeze)
scheme.set_preconditioner(opt.preconditioner, opt.step_bound)

# resume: the model and optimizer are the same on every rank, the scheme's state is per rank
ckpt = os.path.join(args.out, "ckpt")
start = 0
if args.resume:
    state = torch.load(os.path.join(ckpt, "common.pt"), weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    scheme.load_state_dict(torch.load(os.path.join(ckpt, f"scheme_rank{rank}.pt"),
                                      weights_only=False))
    start = state["step"]

teacher = torch.Generator().manual_seed(123)
w_true = torch.randn(32, 10, generator=teacher)
for step in range(start, args.steps):
    # a batch of your data (each rank its own shard)
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(64, 32, generator=g)
    y = (x @ w_true).argmax(-1)
    # forward, backward (the hook averages compressed), step
    loss = F.cross_entropy(ddp(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    qat.before_step()
    opt.step()
    qat.after_step()
    if args.stop_at is not None and step + 1 == args.stop_at:
        break
step += 1

# checkpoint: one common file, one scheme file per rank (error feedback differs by rank)
os.makedirs(ckpt, exist_ok=True)
if rank == 0:
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step},
               os.path.join(ckpt, "common.pt"))
torch.save(scheme.state_dict(), os.path.join(ckpt, f"scheme_rank{rank}.pt"))
stats = scheme.stats()
if rank == 0:
    print(f"step {step} loss {loss.item():.4f} sent {stats['comm/bytes_sent'] / 1e3:.1f} kB "
          f"(fp32 {stats['comm/bytes_raw'] / 1e3:.1f} kB)")
    if step == args.steps:  # the packed model: INT8 codes + scales (safetensors + json)
        print("exported", quant.save_export(model, os.path.join(args.out, "export")))
dist.barrier()
dist.destroy_process_group()

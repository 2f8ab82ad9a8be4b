"""A Lightning run for tests/test_lightning.py: a small transformer-free model trained by
``Trainer(strategy=..., devices=2)`` with :class:`dqt.integrations.lightning.DQTCompression`.
Batches are a function of (global step, rank), so a resumed run sees the same data.

    python tests/lightning_job.py OUT --steps 20 [--save-every 10] [--resume CKPT] [--strategy ddp]
        [--devices 2] [--codec onebit|ternary_grad]
"""

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dqt.comm as comm  # noqa: E402
from dqt.integrations.lightning import DQTCompression  # noqa: E402
from dqt.optim import FrozenVarianceAdamW  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                                 nn.Linear(128, 4))

    def training_step(self, batch, idx):
        g = torch.Generator().manual_seed(1000 * self.trainer.global_step + self.global_rank)
        x = torch.randn(32, 16, generator=g)
        y = (x[:, :4] * x[:, 4:8]).argmax(-1)
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return FrozenVarianceAdamW(self.parameters(), lr=3e-3, weight_decay=0.01, freeze_steps=5)


ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--save-every", type=int, default=0)
ap.add_argument("--resume", default=None)
ap.add_argument("--strategy", default="ddp")
ap.add_argument("--devices", type=int, default=2)
ap.add_argument("--codec", default="onebit", choices=["onebit", "ternary_grad"])
ap.add_argument("--fp16-scale", type=float, default=0.0,
                help="train under a GradScaler with this fixed loss scale (fp16 autocast)")
args = ap.parse_args()
torch.manual_seed(0)
codec = comm.OneBit if args.codec == "onebit" else comm.TernaryGrad
cb = DQTCompression(codec(warmup_steps=5, min_bucket_numel=0))
callbacks = [cb]
if args.save_every:
    callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"),
                                                  every_n_train_steps=args.save_every,
                                                  save_top_k=-1, filename="{step}"))
plugins = []
if args.fp16_scale:  # Lightning's fp16 AMP with a CPU GradScaler (fixed scale: no growth)
    from lightning.pytorch.plugins import MixedPrecision
    plugins.append(MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler(
        "cpu", init_scale=args.fp16_scale, growth_interval=10**9)))
trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, max_steps=args.steps,
                     callbacks=callbacks, plugins=plugins, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=bool(args.save_every),
                     deterministic=True)
model = Net()
data = DataLoader(TensorDataset(torch.zeros(10_000, 1)), batch_size=1)  # the step draws the batch
trainer.fit(model, data, ckpt_path=args.resume)
os.makedirs(args.out, exist_ok=True)
stats = cb.scheme.stats()
torch.save({"params": [p.detach().clone() for p in model.parameters()],
            "bytes_sent": stats["comm/bytes_sent"], "bytes_raw": stats["comm/bytes_raw"],
            "scheme": cb.scheme.state_dict()},
           os.path.join(args.out, f"rank{trainer.global_rank}.pt"))

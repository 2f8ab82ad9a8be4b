"""Why a codec that trains SGD models can fail under Adam: measurements on the character GPT.

    python -m benchmarks.compression_under_adam                  # 600 steps, report at 100/300/600
    python -m benchmarks.compression_under_adam --steps 300 --report 100 300 --codecs onebit ternary_grad

One process simulates ``--ranks`` ranks (one micro-batch each) and follows the exact trajectory:
AdamW on the exact average of the ranks' gradients, the ``experiment=shakespeare_char`` model
and hyper-parameters. Along it, every codec gets the same gradients and keeps its own state (its
error-feedback residuals, and two shadow Adams fed with its two-phase average: one with an
adaptive variance, one whose variance froze at ``--freeze`` on exact gradients). At each report
step it prints, per parameter group (token/position embeddings, attention q/k/v and output,
MLP, LayerNorm, biases):

* ``err`` — ‖average − exact‖ / ‖exact‖ of that step's gradient average;
* ``peak`` — the mean over the codec's blocks of max|g| / rms(g) (how far one value sets the
  block's scale above the typical value: ternary and QSGD code everything else relative to it);
* ``v×`` — median over coordinates of v_codec / v_exact (Adam's second moment inflated by the
  codec's noise);
* ``cos`` — cosine between the shadow Adam's update and the exact Adam's update;
  ``cos frozen`` — the same with the frozen variance.

No distributed run is needed: the codec runs through its real kernels and two-phase maths
(encode every rank, average the decodes, re-encode the average), which is what every rank of
the real collective decodes.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from dqt.comm.compressors import build_compressor
from dqt.comm.layout import ParamSlot, build_layout
from dqt.kernels import blockq
from dqt.train.data import ShakespeareConfig, build_dataset
from dqt.train.models import GPT

GROUPS = ("tok_emb", "pos_emb", "attn_qkv", "attn_out", "mlp", "layernorm", "bias")


def group_of(name: str) -> str:
    if name.startswith("wte"):
        return "tok_emb"
    if name.startswith("wpe"):
        return "pos_emb"
    if "ln_" in name:
        return "layernorm"
    if name.endswith("bias"):
        return "bias"
    if "c_attn" in name:
        return "attn_qkv"
    if "c_proj" in name:
        return "attn_out"
    return "mlp"


class Codec:
    """A codec over the model's flat gradient: blocks never cross a tensor, two-phase maths."""

    def __init__(self, name: str, sizes: list[int], ranks: int) -> None:
        self.comp = build_compressor(name)
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        self.layout = build_layout([ParamSlot(o, o, n) for o, n in zip(offs, sizes)], 1, 0,
                                   self.comp.spec)
        self.msg = torch.zeros(self.layout.msg_nbytes, dtype=torch.uint8)
        n = offs[-1]
        ef = self.comp.cfg.error_feedback
        self.worker = [torch.zeros(n) for _ in range(ranks)] if ef else None
        self.server = torch.zeros(n) if ef else None

    def _code(self, x: torch.Tensor, residual: torch.Tensor | None, key: int) -> torch.Tensor:
        out = torch.empty_like(x)
        blockq.encode(self.comp.spec, x.contiguous(), self.layout.all_blocks, self.msg,
                      residual, key=key)
        blockq.decode(self.comp.spec, self.msg, self.layout.all_blocks, out)
        return out

    def average(self, grads: list[torch.Tensor], step: int) -> torch.Tensor:
        decs = [self._code(g, self.worker[r] if self.worker else None, 100 * step + r)
                for r, g in enumerate(grads)]
        return self._code(torch.stack(decs).mean(0), self.server, 100 * step + 99)

    def peaks(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each block's max|g| / rms(g), each block's first position). One chunk: the blocks
        tile the flat buffer in order."""
        t = self.layout.all_blocks
        lens = t[:, 2]
        bid = torch.repeat_interleave(torch.arange(len(lens)), lens)
        amax = torch.zeros(len(lens)).scatter_reduce(0, bid, g.abs(), "amax")
        rms = (torch.zeros(len(lens)).index_add(0, bid, g * g) / lens).sqrt()
        return torch.where(rms > 0, amax / rms.clamp_min(1e-30), 0.0), t[:, 0]


class ShadowAdam:
    def __init__(self, n: int, betas: tuple[float, float]) -> None:
        self.m, self.v = torch.zeros(n), torch.zeros(n)
        self.b1, self.b2 = betas
        self.v_frozen: torch.Tensor | None = None

    def update(self, g: torch.Tensor, t: int, freeze: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(adaptive-variance update, frozen-variance update) for gradient ``g`` at step t."""
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        mh = self.m / (1 - self.b1 ** t)
        adaptive = mh / ((self.v / (1 - self.b2 ** t)).sqrt() + 1e-8)
        frozen = adaptive if self.v_frozen is None else mh / (self.v_frozen.sqrt() + 1e-8)
        return adaptive, frozen

    def freeze_with(self, v_exact: torch.Tensor, t: int) -> None:
        self.v_frozen = v_exact / (1 - self.b2 ** t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--report", type=int, nargs="+", default=[100, 300, 600])
    ap.add_argument("--freeze", type=int, default=100)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--codecs", nargs="+", default=["onebit", "ef_signsgd", "ternary_grad", "qsgd"])
    args = ap.parse_args()
    torch.manual_seed(0)
    data = build_dataset(ShakespeareConfig(block_size=64, eval_windows=64))
    model = GPT(data.meta.num_classes, 64, 4, 4, 128)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    index = {g: torch.cat([torch.arange(sum(sizes[:i]), sum(sizes[:i + 1]))
                           for i, n in enumerate(names) if group_of(n) == g]) for g in GROUPS}
    n = sum(sizes)
    group_id = torch.empty(n, dtype=torch.long)
    for g, i in index.items():
        group_id[i] = GROUPS.index(g)
    betas = (0.9, 0.99)
    opt = torch.optim.AdamW(params, lr=1e-3, betas=betas, weight_decay=0.1)
    codecs = {c: Codec(c, sizes, args.ranks) for c in args.codecs}
    exact_adam = ShadowAdam(n, betas)
    shadows = {c: ShadowAdam(n, betas) for c in args.codecs}
    gen = torch.Generator().manual_seed(1)
    print(f"character GPT ({n:,} parameters), {args.ranks} ranks × {args.batch} windows, AdamW "
          f"betas {betas}; variance frozen at step {args.freeze} for 'cos frozen'")
    for step in range(1, args.steps + 1):
        grads = []
        for _ in range(args.ranks):
            x, y = data.train.batch(torch.randint(len(data.train), (args.batch,), generator=gen))
            model.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        exact = torch.stack(grads).mean(0)
        u_exact, _ = exact_adam.update(exact, step, args.freeze)
        report = step in args.report
        rows = {}
        for name, codec in codecs.items():
            avg = codec.average(grads, step)
            if step == args.freeze:
                shadows[name].freeze_with(exact_adam.v, step)
            u, u_frozen = shadows[name].update(avg, step, args.freeze)
            if report:
                peak, first = codec.peaks(exact)
                rows[name] = {g: (float((avg[i] - exact[i]).norm() / exact[i].norm()),
                                  float(peak[group_id[first] == GROUPS.index(g)].mean()),
                                  float((shadows[name].v[i] / exact_adam.v[i].clamp_min(1e-30)).median()),
                                  float(F.cosine_similarity(u[i], u_exact[i], dim=0)),
                                  float(F.cosine_similarity(u_frozen[i], u_exact[i], dim=0)))
                              for g, i in index.items()}
        if step == args.freeze:
            exact_adam.v_frozen = None
        for p, g in zip(params, exact.split(sizes)):
            p.grad = g.view_as(p).clone()
        for grp in opt.param_groups:
            grp["lr"] = 1e-3 * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
                math.pi * max(0, step - 100) / max(1, args.steps - 100))))
        opt.step()
        if report:
            print(f"\nstep {step}\n\n| codec | group | err | peak | v× | cos | cos frozen |\n"
                  "|---|---|---|---|---|---|---|")
            for name, per in rows.items():
                for g, (err, peak, vx, cos, cosf) in per.items():
                    print(f"| {name} | {g} | {err:.2f} | {peak:.1f} | {vx:.2f} | {cos:.2f} | "
                          f"{cosf:.2f} |")


if __name__ == "__main__":
    main()

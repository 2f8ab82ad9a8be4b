"""A codec under frozen-variance Adam compresses the gradient in Adam's units: the scheme divides
each bucket by the optimizer's preconditioner (√v̂ + ε) before encoding and multiplies the
decoded average back, with the divided gradient clamped to a bound (Adam's step bound). Checked
on real gloo ranks against the same codec run on the divided (and clamped) gradient, on the
optimizer's preconditioner itself, and through the CLI (resume == uninterrupted).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dqt.comm import build_scheme
from dqt.comm.collective import run_sync
from dqt.comm.config import OneBitConfig, QSGDConfig, TernaryGradConfig
from dqt.optim import FrozenVarianceAdamW
from tests.conftest import checkpoints, rank_process, run_train

SIZES = [300, 7, 129, 64]
CODECS = {"onebit": OneBitConfig, "ternary_grad": TernaryGradConfig, "qsgd": QSGDConfig}
BOUND = 3.0  # the clamp on the scaled gradient (Adam's step bound in the trainer)


class _Bucket:
    """One DDP-style gradient bucket: a flat buffer whose views are the parameters' gradients
    (the parameters' order is the buffer's)."""

    def __init__(self, params: list[nn.Parameter], buf: torch.Tensor) -> None:
        self.params, self.buf = params, buf
        offs = [0]
        for p in params:
            offs.append(offs[-1] + p.numel())
        self.grads = [buf[a:b].view_as(p) for p, a, b in zip(params, offs, offs[1:])]

    def buffer(self) -> torch.Tensor:
        return self.buf

    def gradients(self) -> list[torch.Tensor]:
        return self.grads

    def parameters(self) -> list[nn.Parameter]:
        return self.params

    def is_last(self) -> bool:
        return True


def _scheme(name: str, params: list[nn.Parameter]):
    scheme = build_scheme(CODECS[name](min_bucket_numel=0))
    holder = types.SimpleNamespace(module=nn.ParameterList(params), attach_scheme=lambda s: None)
    scheme.attach(holder)  # the flat parameter index and the error-feedback residuals
    return scheme


@rank_process
def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    params = [nn.Parameter(torch.zeros(n)) for n in SIZES]
    gen = torch.Generator().manual_seed(5)  # the same scales on every rank
    scales = {id(p): torch.exp(3 * torch.randn(p.numel(), generator=gen)) for p in params}
    flat_scale = torch.cat([scales[id(p)] for p in params])
    results = {}
    for name, bound in [(n, None) for n in CODECS] + [(f"{n} bound", BOUND) for n in CODECS]:
        pre, plain = _scheme(name.split()[0], params), _scheme(name.split()[0], params)
        pre.set_preconditioner(lambda p: scales[id(p)], bound)
        outs = []
        for step in range(3):  # the residuals of error feedback carry over between steps
            g = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(100 * rank + step))
            scaled = g / flat_scale if bound is None else (g / flat_scale).clamp(-bound, bound)
            results.setdefault("clamped", []).append(int(((g / flat_scale).abs() > BOUND).sum()))
            ba, bb = _Bucket(params, g.clone()), _Bucket(params, scaled)
            a = run_sync(pre._compressed(ba.buffer(), ba), pre.process_group, pre.meter)
            b = run_sync(plain._compressed(bb.buffer(), bb), plain.process_group, plain.meter)
            pre.step += 1
            plain.step += 1
            outs.append((a, b * flat_scale))
        results[name] = outs
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_preconditioned_codec_equals_the_codec_on_the_scaled_gradient(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert min(ranks[0]["clamped"]) > 10  # the bound cuts some values at every step
    for name in [*CODECS, *(f"{n} bound" for n in CODECS)]:
        for step, (a, b) in enumerate(ranks[0][name]):
            assert torch.equal(a, b), f"{name} step {step}: not the codec on g / scale, scaled back"
            for r in range(1, world):
                assert torch.equal(ranks[r][name][step][0], a), f"{name}: rank {r} differs"


def test_the_preconditioner_is_the_frozen_denominator_after_the_freeze():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    dead = nn.Parameter(torch.ones(4))  # never gets a gradient
    opt = FrozenVarianceAdamW([*model.parameters(), dead], lr=1e-2, eps=1e-8, freeze_steps=3)
    first = model[0].weight
    for k in range(4):
        assert (opt.preconditioner(first) is None) == (k < 3)
        g = torch.Generator().manual_seed(k)
        opt.zero_grad()
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        opt.step()
    v = opt.exp_avg_sq[:first.numel()].view_as(first)
    expected = (v / (1 - 0.999 ** 3)).sqrt() + 1e-8
    torch.testing.assert_close(opt.preconditioner(first), expected, rtol=0, atol=0)
    assert torch.equal(opt.preconditioner(dead), torch.ones(4))
    assert opt.preconditioner(nn.Parameter(torch.zeros(2))) is None  # not the optimizer's


@pytest.mark.slow
def test_trainer_resume_equals_uninterrupted_with_a_preconditioned_codec(tmp_path):
    """adamw + onebit through launch/train.py (variance frozen at step 8, the codec
    preconditioned from then on): 20 steps + resume to 40 == 40 steps, bitwise."""
    common = ["optim=adamw", "optim.lr=0.003", "+scheme=onebit", "optim.freeze_steps=8",
              "optim.precondition=true", "optim.schedule=constant", "eval_every=0", "deterministic=true"]
    for args in ([*common, "steps=40", f"hydra.run.dir={tmp_path}/full"],
                 [*common, "steps=20", f"hydra.run.dir={tmp_path}/split"],
                 [*common, "steps=40", f"hydra.run.dir={tmp_path}/split"]):
        p = run_train(*args, nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
    full, split = tmp_path / "full", tmp_path / "split"
    assert "resumed from step 20" in (split / "train_rank0.log").read_text()
    a, b = (torch.load(checkpoints(d)[-1] / "train.pt", weights_only=False) for d in (full, split))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for r in range(2):
        ra, rb = (torch.load(checkpoints(d)[-1] / f"rank{r}.pt", weights_only=False)["scheme"]
                  for d in (full, split))
        assert ra["worker_residual"].abs().sum() > 0
        assert torch.equal(ra["worker_residual"], rb["worker_residual"])

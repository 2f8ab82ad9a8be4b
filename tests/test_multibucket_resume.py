"""Resume is bitwise with several gradient buckets: through the real CLI on 2 ranks, a model
whose gradients fill 4 buckets (``backend.bucket_cap_mb``) trained 6 steps, then resumed to 12,
ends with the parameters and every rank's worker and server residuals of an uninterrupted
12-step run. (A fresh process's first step puts every gradient into one DDP bucket; the scheme
follows the bucket compositions saved in the checkpoint instead.)"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import checkpoints, read_metrics, run_train

COMMON = ["model.widths=[64,64,64]", "backend.bucket_cap_mb=0.01", "eval_every=0",
          "log_every=1", "optim.schedule=constant", "checkpoint.every=6"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [["+scheme=onebit"], ["+scheme=ternary_grad"],
                                    ["+scheme=ternary_grad", "scheme.overlap=false"]],
                         ids=["onebit", "ternary_grad", "ternary_grad_inline"])
def test_multi_bucket_resume_is_bitwise(scheme, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    for args in (["steps=12", f"hydra.run.dir={full}"], ["steps=6", f"hydra.run.dir={split}"],
                 ["steps=12", f"hydra.run.dir={split}"]):
        p = run_train(*scheme, *COMMON, *args, nproc=2)
        assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from step 6" in (split / "train_rank0.log").read_text()
    ranks = [torch.load(checkpoints(full)[-1] / f"rank{r}.pt", weights_only=False)["scheme"]
             for r in range(2)]
    assert len(ranks[0]["buckets"]) >= 3, ranks[0]["buckets"]
    collectives = {r["step"]: r["comm/collectives"] for r in read_metrics(full)
                   if r["kind"] == "train"}
    assert collectives[12] >= 6  # every bucket compressed: two collectives each
    a, b = (torch.load(checkpoints(d)[-1] / "train.pt", weights_only=False)["model"]
            for d in (full, split))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the resume"
    for r in range(2):
        ra, rb = (torch.load(checkpoints(d)[-1] / f"rank{r}.pt", weights_only=False)["scheme"]
                  for d in (full, split))
        for key in ("worker_residual", "server_residual"):
            if ra[key] is not None:
                assert ra[key].abs().sum() > 0
                assert torch.equal(ra[key], rb[key]), f"rank {r}: {key} differs"
        assert ra["buckets"] == rb["buckets"]

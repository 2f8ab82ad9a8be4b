"""A diverging run stops with one message and never checkpoints non-finite parameters; float
options refuse inf and nan (they pass range checks such as ``> 0``)."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import checkpoints, run_train


@pytest.mark.parametrize("override,key", [
    ("optim.lr=inf", "optim.lr"), ("optim.weight_decay=inf", "optim.weight_decay"),
    ("optim.grad_clip=inf", "optim.grad_clip"), ("optim.lr=-inf", "optim.lr"),
    ("+scheme=ternary_grad scheme.clip_sigma=inf", "scheme.clip_sigma")])
def test_float_options_refuse_inf(compose, override, key):
    from dqt.config import to_typed
    from dqt.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(key) + r": must be (a finite number|> 0)"):
        to_typed(compose(*override.split()))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [[], ["+scheme=onebit"]])
def test_a_diverging_run_stops_and_keeps_finite_checkpoints(scheme, tmp_path):
    p = run_train("optim.lr=1e6", "steps=30", "checkpoint.every=1", "eval_every=0", *scheme,
                  f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode != 0
    m = re.search(r"dqt: training diverged: step (\d+): the training loss is not finite on "
                  r"rank\(s\) 0, 1; stopped before the optimizer step\. The newest checkpoint "
                  r"\(step (\d+)\) holds finite parameters\. Lower optim\.lr \(now 1e\+06\)",
                  p.stderr)
    assert m, p.stderr[-2000:]
    stopped, newest = int(m.group(1)), int(m.group(2))
    assert stopped < 30 and newest == stopped - 1
    saved = checkpoints(tmp_path)
    assert saved and saved[-1].name == f"step_{newest:07d}"
    for ckpt in saved:
        model = torch.load(ckpt / "train.pt", weights_only=False)["model"]
        assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point()), ckpt

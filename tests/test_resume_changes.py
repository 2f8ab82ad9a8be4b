"""What a resume with a changed run refuses or records, through the real CLI on 2 ranks:

* another scheme is refused naming ``checkpoint.allow_scheme_change`` before anything is
  trained or rewritten; allowed, it warns and the new scheme starts with fresh state;
* every attempt's Hydra record is kept (``.hydra`` then ``.hydra/attempt_N``), a refused
  world-size change included, so the record of what the run was is never overwritten.
"""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import checkpoints, run_train

COMMON = ["eval_every=0", "checkpoint.every=3"]


def _overrides(path):
    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_a_scheme_change_is_refused_then_allowed_with_a_warning(tmp_path):
    run = [*COMMON, f"hydra.run.dir={tmp_path}"]
    p = run_train("+scheme=onebit", "steps=3", *run, nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    config = (tmp_path / "config.yaml").read_text()
    p = run_train("+scheme=ternary_grad", "steps=6", *run, nproc=2)
    assert p.returncode != 0  # torchrun's exit code; the ranks exit with 2
    assert ("dqt: config error: checkpoint.allow_scheme_change: "
            f"{checkpoints(tmp_path)[-1]} was written with scheme 'onebit' but this run has "
            "'ternary_grad'") in p.stderr
    assert (tmp_path / "config.yaml").read_text() == config, "config.yaml was rewritten"
    assert [c.name for c in checkpoints(tmp_path)] == ["step_0000003"]
    p = run_train("+scheme=ternary_grad", "steps=6", "checkpoint.allow_scheme_change=true",
                  *run, nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (tmp_path / "train_rank0.log").read_text()
    assert "scheme changed on resume ('onebit' → 'ternary_grad', " \
        "checkpoint.allow_scheme_change): model and optimizer restored" in log
    assert "resumed from step 3" in log
    history = [_overrides(tmp_path / ".hydra" / "overrides.yaml")] + \
        [_overrides(tmp_path / ".hydra" / f"attempt_{n}" / "overrides.yaml") for n in (2, 3)]
    assert [h[0] for h in history] == ["+scheme=onebit", "+scheme=ternary_grad",
                                       "+scheme=ternary_grad"]
    assert "checkpoint.allow_scheme_change=true" in history[2]


@pytest.mark.slow
def test_a_refused_world_size_change_keeps_the_hydra_record(tmp_path):
    run = [*COMMON, f"hydra.run.dir={tmp_path}"]
    p = run_train("steps=3", *run, nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    first = (tmp_path / ".hydra" / "config.yaml").read_text()
    p = run_train("steps=6", *run, nproc=1)
    assert p.returncode == 2 and "checkpoint.allow_world_size_change" in p.stderr
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == first
    assert (tmp_path / ".hydra" / "attempt_2" / "overrides.yaml").exists()


@pytest.mark.parametrize("change,key,says", [
    ("model.widths=[32]", "checkpoint.resume", "holds a different model (Error(s) in loading "
     "state_dict for MLP:; Unexpected key(s) in state_dict"),
    ("optim=adamw", "optim.name", "holds the state of another optimizer")])
def test_a_different_model_or_optimizer_names_the_checkpoint(change, key, says, tmp_path):
    p = run_train("steps=2", "eval_every=0", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run_train("steps=4", "eval_every=0", change, f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    ckpt = checkpoints(tmp_path)[-1]
    assert f"dqt: config error: {key}: {ckpt} {says}" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr

"""``backend.parallel=fsdp`` through the real CLI (torchrun, 2 and 4 gloo ranks): FSDP2's
``fully_shard`` with dqt's codecs in the gradient reduce-scatter, checkpoints through
``torch.distributed.checkpoint``.

* an interrupted run resumed from its checkpoint ends bitwise equal to the uninterrupted run:
  the parameters, the optimizer state and every rank's error-feedback residuals;
* every file of the sharded state is covered by the checkpoint's digests: a damaged shard file
  makes the resume fall back to the previous checkpoint;
* a resume on another number of ranks reshards the model and optimizer and starts the residuals
  from their mean (or from zero);
* what FSDP cannot run is refused before any work, naming the key.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import checkpoints, read_metrics, run_train, summary

COMMON = ["backend.parallel=fsdp", "model.widths=[64,48]", "eval_every=0", "log_every=1",
          "optim.schedule=constant", "scheme.min_bucket_numel=0"]


def _dcp(ckpt) -> dict[str, torch.Tensor]:
    """The whole state a sharded checkpoint holds, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt / "full.pt"
    dcp_to_torch_save(ckpt / "dcp", out)
    state = torch.load(out, weights_only=False)
    out.unlink()
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}{k}.", x)
        elif isinstance(v, torch.Tensor):
            flat[prefix[:-1]] = v

    walk("", state)
    return flat


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["onebit", "ternary_grad"])
def test_fsdp_resume_is_bitwise(scheme, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    for args in (["steps=8", f"hydra.run.dir={full}"], ["steps=4", f"hydra.run.dir={split}"],
                 ["steps=8", f"hydra.run.dir={split}"]):
        p = run_train(f"+scheme={scheme}", *COMMON, "checkpoint.every=4", *args, nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 4" in (split / "train_rank0.log").read_text()
    a, b = (_dcp(checkpoints(d)[-1]) for d in (full, split))
    assert a.keys() == b.keys()
    residuals = [k for k in a if k.startswith("scheme.residual.")]
    if scheme == "onebit":  # error feedback: a (2, numel) row per rank, non-zero
        assert residuals and all(a[k].shape[0] == 2 and a[k].abs().sum() > 0 for k in residuals)
    assert any(k.startswith("optim.") for k in a) and any(k.startswith("model.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the resume"
    sa, sb = summary(full), summary(split)
    assert sa["params_in_sync"] and sa["params_sha256"] == sb["params_sha256"]
    assert sa["comm/bytes_sent_total"] == sb["comm/bytes_sent_total"]
    assert sa["comm/ratio"] > 10
    meta = json.loads((checkpoints(full)[-1] / "meta.json").read_text())
    assert "dcp/.metadata" in meta["sha256"] and "dcp/__0_0.distcp" in meta["sha256"]


@pytest.mark.slow
def test_damaged_shard_falls_back_and_world_size_change_reshards(tmp_path):
    run = tmp_path / "run"
    p = run_train("+scheme=onebit", *COMMON, "steps=6", "checkpoint.every=3",
                  "checkpoint.keep=3", f"hydra.run.dir={run}", nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = _dcp(checkpoints(run)[-1])
    shard = checkpoints(run)[-1] / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-7])  # the newest checkpoint's rank-1 file, torn
    p = run_train("+scheme=onebit", *COMMON, "steps=9", "checkpoint.allow_world_size_change=true",
                  f"hydra.run.dir={run}", nproc=4, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run / "train_rank0.log").read_text()
    assert "dcp/__1_0.distcp does not match the sha256" in log
    assert "resumed from step 3" in log
    assert "world size changed (2 → 4): restored model and optimizer (resharded) and the " \
           "error-feedback residuals' mean" in log
    rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in rows][-6:] == [4, 5, 6, 7, 8, 9]
    assert all(r["train/loss"] < 3.0 for r in rows)
    after = _dcp(checkpoints(run)[-1])
    res = [k for k in after if k.startswith("scheme.residual.")]
    assert res and all(after[k].shape[0] == 4 for k in res)
    assert saved["scheme.residual." + res[0].split("scheme.residual.")[1]].shape[0] == 2


@pytest.mark.parametrize("args,key", [
    (["+scheme=powersgd"], "scheme.name"),
    (["qat=dorefa_w2a2"], "backend.parallel"),
    (["optim=onebit_adam"], "backend.parallel"),
    (["+scheme=onebit", "scheme.auto=true"], "scheme.auto"),
    (["backend.parallel=zero3"], "backend.parallel"),
    (["optim=adamw", "+scheme=onebit"], "optim.freeze_variance"),
    (["backend.parallel=ddp", "backend.fsdp_gather=bf16"], "backend.fsdp_gather"),
])
def test_what_fsdp_cannot_run_is_refused_first(args, key, tmp_path):
    parallel = [] if any(a.startswith("backend.parallel=") for a in args) else \
        ["backend.parallel=fsdp"]
    p = run_train(*parallel, *args, f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"dqt: config error: {key}:" in p.stderr
    assert not (tmp_path / "r").exists()

"""The library surface: ``dqt.comm.compress`` and its misuse messages, presets by name equal to
what the trainer composes, docstrings on every public object, the library importing none of the
trainer's dependencies, and ``examples/own_loop.py`` under real torchrun (ranks identical,
resume == uninterrupted, the export readable)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dqt.comm as comm
import dqt.quant as quant
from dqt.comm.config import SCHEME_CONFIGS
from tests.conftest import REPO, clean_env, rank_process


@pytest.mark.parametrize("name", sorted(SCHEME_CONFIGS))
def test_a_scheme_preset_is_what_the_trainer_composes(compose, name):
    from dqt.config import to_typed

    assert comm.preset(name) == to_typed(compose(f"+scheme={name}")).scheme


@pytest.mark.parametrize("name", quant.presets())
def test_a_qat_preset_is_what_the_trainer_composes(compose, name):
    from dqt.config import to_typed

    assert quant.preset(name) == to_typed(compose(f"qat={name}")).qat


def test_unknown_presets_list_the_valid_names():
    with pytest.raises(ValueError, match="unknown scheme preset 'ternary'; the presets are: bf16, "):
        comm.preset("ternary")
    with pytest.raises(ValueError, match="unknown qat preset 'int8'; the presets are: admm_ternary"):
        quant.preset("int8")


@rank_process
def _misuse_worker(rank: int, world: int, store: str, out: str) -> None:
    errors = []

    def expect(exc: type, fn) -> None:
        try:
            fn()
            errors.append(None)
        except exc as e:
            errors.append(str(e))

    model = nn.Linear(4, 2)
    expect(RuntimeError, lambda: comm.compress(DDP.__new__(DDP), comm.OneBit()))  # no group yet
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ddp = DDP(model)
    expect(TypeError, lambda: comm.compress(model, comm.OneBit()))
    expect(TypeError, lambda: comm.compress(ddp, {"name": "onebit"}))
    expect(ValueError, lambda: comm.compress(ddp, "one_bit"))
    handle = comm.compress(ddp, "ternary_grad")
    expect(RuntimeError, lambda: comm.compress(ddp, comm.OneBit()))
    errors.append(comm.attached(ddp) is handle and comm.attached(DDP(nn.Linear(2, 2))) is None)
    torch.save(errors, f"{out}/rank{rank}.pt")


def test_misuse_fails_with_one_message(tmp_path):
    mp.spawn(_misuse_worker, args=(1, str(tmp_path / "store"), str(tmp_path)), nprocs=1, join=True)
    errors = torch.load(tmp_path / "rank0.pt")
    assert errors[0] == ("dqt.comm.compress: call torch.distributed.init_process_group first "
                         "(the scheme makes a process group of its own)")
    assert errors[1].startswith("dqt.comm.compress: model must be wrapped in torch.nn.parallel."
                                "DistributedDataParallel") and errors[1].endswith("got Linear")
    assert errors[2].startswith("dqt.comm.compress: config must be a scheme config (")
    assert errors[3].startswith("unknown scheme preset 'one_bit'; the presets are:")
    assert errors[4] == ("dqt.comm.compress: this model already has a dqt scheme (ternary_grad); "
                         "DDP takes one communication hook, so wrap the module in a new "
                         "DistributedDataParallel")
    assert errors[5] is True


@pytest.mark.parametrize("module", [comm, quant])
def test_every_public_object_explains_itself(module):
    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"{module.__name__}.{name} has no docstring"


def test_the_library_imports_none_of_the_trainers_dependencies():
    code = ("import sys, dqt.comm, dqt.quant, dqt.kernels, dqt.optim\n"
            "print(sorted(m for m in ('hydra', 'wandb', 'matplotlib', 'sklearn', 'dqt.train', "
            "'dqt.config') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _example(tmp_path, out: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "examples" / "own_loop.py"), "--out", str(tmp_path / out), *args]
    p = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_the_example_resumes_bitwise_and_exports(tmp_path):
    full = _example(tmp_path, "full", "--steps", "30")
    _example(tmp_path, "split", "--steps", "30", "--stop-at", "15")
    _example(tmp_path, "split", "--steps", "30", "--resume")
    a = torch.load(tmp_path / "full" / "ckpt" / "common.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "ckpt" / "common.pt", weights_only=False)
    assert a["step"] == b["step"] == 30
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "resume differs"
    for r in range(2):  # the per-rank scheme state (step; error feedback is off for ternary)
        sa = torch.load(tmp_path / "full" / "ckpt" / f"scheme_rank{r}.pt", weights_only=False)
        sb = torch.load(tmp_path / "split" / "ckpt" / f"scheme_rank{r}.pt", weights_only=False)
        assert sa["step"] == sb["step"] == 30
    assert "exported" in full
    tensors, doc = quant.read_export(str(tmp_path / "full" / "export"))
    # w8a8 leaves the first and last layers in full precision: the middle one is INT8 codes,
    # four to an int32 word
    assert tensors["2.weight.packed"].dtype == torch.int32
    assert tuple(tensors["2.weight.packed"].shape) == (64, 256)
    assert doc["summary"]["packed_bytes"] < doc["summary"]["fp32_bytes"]
    rebuilt = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                            nn.Linear(256, 10))
    quant.quantize_(rebuilt, quant.preset("w8a8"))
    quant.load_packed(rebuilt, tensors, doc)
    x = torch.randn(8, 32)
    assert rebuilt(x).shape == (8, 10)

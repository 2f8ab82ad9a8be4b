"""convert → export (safetensors + JSON) → reload → inference equality, for every weight
quantizer; the packed layout is the kernels' (``dqt.kernels.lowbit_pack``); the size summary;
the export and report CLIs on a real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import REPO, clean_env, run_train
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.kernels.lowbit_pack import dequantize_weight, unpack_weight
from dqt.quant import QUANTIZERS, apply_qat, qat_step
from dqt.quant.export.convert import load_packed
from dqt.quant.export.serialize import read_export, save_export
from dqt.quant.export.summary import summarize
from dqt.train.data import DataMeta
from dqt.train.models import LeNetCNN
from tests.cases import EXPORT_ARGS as WEIGHT_ARGS  # every weight quantizer, with its arguments

ACT = QuantizerConfig(name="uint", bits=8)


def test_every_weight_quantizer_is_export_tested():
    weight = {n for n in QUANTIZERS.names() if "weight" in QUANTIZERS.get(n).kinds}
    assert weight == set(WEIGHT_ARGS)


def trained(name: str, extra: dict | None = None, fold_bn: bool = False,
            batch_norm: bool = False) -> nn.Module:
    """A small CNN (with BatchNorm: ``batch_norm``) with ``name`` on every conv/linear weight,
    3 SGD steps (+ qat_step)."""
    torch.manual_seed(0)
    spec = QuantizerConfig(name=name, **{**WEIGHT_ARGS[name], **(extra or {})})
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=spec, act=ACT), keep_first_last=False,
                    fold_bn=fold_bn)
    model = apply_qat(cfg, LeNetCNN((1, 8, 8), [4, 6], 12, 10, batch_norm=batch_norm))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(), opt.zero_grad()
        qat_step(model)
    return model.eval(), cfg


@pytest.mark.parametrize("name", sorted(WEIGHT_ARGS))
def test_export_reload_gives_bitwise_equal_outputs(name, tmp_path):
    model, cfg = trained(name)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    save_export(model, str(tmp_path), {"note": "test"})
    tensors, doc = read_export(str(tmp_path))
    assert set(doc["layers"]) == {"features.0", "features.3", "classifier.0", "classifier.2"}
    torch.manual_seed(1)  # a different init: everything must come from the export
    fresh = apply_qat(cfg, LeNetCNN((1, 8, 8), [4, 6], 12, 10))
    load_packed(fresh, tensors, doc).eval()
    with torch.no_grad():
        out = fresh(x)
    assert torch.equal(out, ref), (out - ref).abs().max()
    # the quantized weights themselves, bit for bit
    for layer in doc["layers"]:
        assert torch.equal(fresh.get_submodule(layer).weight, model.get_submodule(layer).weight)


@pytest.mark.parametrize("name,bits", [("bwn", 1), ("twn", 2), ("dorefa_w", 2), ("int", 8),
                                       ("uint", 4)])
def test_affine_export_is_the_packed_gemm_layout(name, bits, tmp_path):
    model, _ = trained(name)
    save_export(model, str(tmp_path))
    t = load_file(str(tmp_path / "model.safetensors"))
    meta = json.loads((tmp_path / "model.json").read_text())["layers"]["classifier.0"]
    assert meta["format"] == "affine" and meta["storage_bits"] == bits
    packed, scale, zero = (t[f"classifier.0.weight.{k}"] for k in ("packed", "scale", "zero"))
    n, k = meta["n"], meta["k"]
    assert packed.dtype == torch.int32 and packed.shape == (-(-k // (32 // bits)), n)
    w = model.classifier[0].weight
    assert torch.equal(dequantize_weight(packed, scale, zero, bits, k), w)
    codes = unpack_weight(packed, bits, k)
    if name == "twn":  # ternary: code t + 1, zero 1
        assert set(codes.unique().tolist()) <= {0, 1, 2} and torch.all(zero == 1)
    if name == "bwn":  # ±α: code [w ≥ 0], zero ½, scale 2α
        assert torch.all(zero == 0.5)
        alpha = model.classifier[0].parametrizations.weight.original.abs().mean(1)
        assert torch.equal(scale, 2 * alpha)


def test_ttq_exports_codes_and_both_scales(tmp_path):
    model, _ = trained("ttq")
    save_export(model, str(tmp_path))
    t = load_file(str(tmp_path / "model.safetensors"))
    q = model.classifier[0].parametrizations.weight[0]
    assert float(q.w_p.detach()) != float(q.w_n.detach())  # trained apart
    assert torch.all(t["classifier.0.weight.pos"] == q.w_p.detach())
    assert torch.all(t["classifier.0.weight.neg"] == q.w_n.detach())
    codes = unpack_weight(t["classifier.0.weight.packed"], 2, 6 * 2 * 2)
    assert set(codes.unique().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("name,fold_bn", [("int", True), ("uint", True), ("ttq", False),
                                          ("dorefa_w", False), ("bnn_sign", False)])
def test_bn_cnn_export_reload_is_bitwise_equal(name, fold_bn, tmp_path):
    """model.batch_norm=true: convs and the hidden Linear (BN folded or not) export exactly."""
    model, cfg = trained(name, fold_bn=fold_bn, batch_norm=True)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    save_export(model, str(tmp_path))
    tensors, doc = read_export(str(tmp_path))
    assert set(doc["layers"]) == {"features.0", "features.4", "classifier.0", "classifier.3"}
    folded = {n: m.get("bn_folded") for n, m in doc["layers"].items()}
    assert folded == ({"features.0": "features.1", "features.4": "features.5",
                       "classifier.0": "classifier.1", "classifier.3": None} if fold_bn
                      else dict.fromkeys(folded))
    torch.manual_seed(1)
    fresh = load_packed(apply_qat(cfg, LeNetCNN((1, 8, 8), [4, 6], 12, 10, batch_norm=True)),
                        tensors, doc).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    if fold_bn:  # the hidden Linear deploys without its BN: linear(x, W_folded) + bias_folded
        fc, bn = model.classifier[0], model.classifier[1]
        h = fc.input_quantizer(torch.rand(4, fc.in_features))
        direct = torch.nn.functional.linear(h, fc.weight, tensors["classifier.0.bias_folded"])
        torch.testing.assert_close(direct, bn(fc(h)), rtol=1e-5, atol=1e-5)


def test_folded_bn_export_equals_and_stores_the_folded_bias(tmp_path):
    from dqt.train.models import CifarResNet

    torch.manual_seed(0)
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="int", bits=4),
                                                     act=ACT), fold_bn=True)
    model = apply_qat(cfg, CifarResNet(3, 8, 10, width=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        model(torch.randn(8, 3, 8, 8)).square().mean().backward()
        opt.step(), opt.zero_grad(), qat_step(model)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    save_export(model, str(tmp_path))
    tensors, doc = read_export(str(tmp_path))
    assert doc["layers"]["layer1.0.conv1"]["bn_folded"] == "layer1.0.bn1"
    torch.manual_seed(3)
    fresh = load_packed(apply_qat(cfg, CifarResNet(3, 8, 10, width=4)), tensors, doc).eval()
    assert torch.equal(fresh(x), ref)
    # deployable without BN: conv(x, W_folded) + bias_folded == BN(conv(x))
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    h = torch.randn(2, 4, 8, 8)
    hq = conv.input_quantizer(h)  # the layer quantizes its input first
    direct = torch.nn.functional.conv2d(hq, conv.weight, tensors["layer1.0.conv1.bias_folded"],
                                        padding=1)
    torch.testing.assert_close(direct, bn(conv(h)), rtol=1e-5, atol=1e-5)


def test_summary_counts_bits_and_bytes():
    model, _ = trained("bwn")
    s = summarize(model)
    rows = {r["layer"]: r for r in s["layers"]}
    fc = rows["classifier.0"]
    n, k = 12, 24
    assert fc["bits"] == 1 and fc["params"] == n * k
    assert fc["bytes"] == 4 * n * 1 + 4 * n + 4 * n  # one int32 word per row (K=24 ≤ 32) + scale + zero
    assert s["params_by_bits"]["1-bit"] == sum(r["params"] for r in s["layers"])
    fp32_rest = sum(p.numel() for n_, p in model.named_parameters() if "original" not in n_)
    assert s["params_by_bits"]["32-bit (full precision)"] >= fp32_rest
    assert s["compression"] == pytest.approx(s["fp32_bytes"] / s["packed_bytes"])
    assert s["compression"] > 1.5


# ------------------------------------------------------------------ the CLIs on a real run
@pytest.mark.slow
def test_export_and_report_cli_on_a_trained_run(tmp_path):
    run = tmp_path / "run"
    p = run_train("qat=ttq", "steps=20", "eval_every=0", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    from tests.conftest import summary
    s = summary(run)
    # the trainer put W_p/W_n in their own group at the preset's lr × 0.001, no weight decay
    ckpt = next((run / "checkpoints").glob("step_*")) / "train.pt"
    groups = torch.load(ckpt, weights_only=False)["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["model", "quantizer"]
    assert len(groups[1]["params"]) == 2 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["initial_lr"] == pytest.approx(0.001 * groups[0]["initial_lr"])
    assert s["qat/compression"] > 2 and "2-bit" in s["qat/params_by_bits"]
    assert "qat size summary" in (run / "train_rank0.log").read_text()
    p = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), str(run)],
                       capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "max |diff| = 0" in p.stdout
    assert (run / "export" / "model.safetensors").exists()
    doc = json.loads((run / "export" / "model.json").read_text())
    assert doc["layers"]["net.2"]["format"] == "ternary2" and doc["qat"]["name"] == "ttq"
    p = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), "--model", str(run)],
                       capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert f"compression {s['qat/compression']:.2f}x" in p.stdout
    p = subprocess.run([sys.executable, str(REPO / "launch" / "export.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert p.returncode == 2 and "not a dqt run directory" in p.stderr

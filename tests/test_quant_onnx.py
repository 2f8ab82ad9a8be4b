"""ONNX export with QDQ nodes (``dqt.quant.export.onnx``), run by onnxruntime on CPU: outputs
equal the fake-quant model's within one 8-bit step of the output range, weights are stored as
integers, and every format ONNX cannot express is refused before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys

import onnx  # the dev extra installs the onnx extra: a missing install fails here
import pytest
import torch
from torch import nn

from dqt.quant import apply_qat, preset, qat_step
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant.export.convert import convert
from dqt.quant.export.onnx import OnnxExportError, export_onnx, output_step, run_onnx
from dqt.train.models import GPT, MLP, LeNetCNN
from tests.cases import EXPORT_ARGS
from tests.conftest import REPO, clean_env, run_train

W8A8 = QATSlotsConfig(weight=QuantizerConfig(name="int", bits=8),
                      act=QuantizerConfig(name="uint", bits=8))
PRESETS = ["int8dyn_int4w", "w8a8"]  # conf/qat/*.yaml
ONNX_FORMATS = {"affine", "affine_group", "dense"}


def build(model_name: str, batch_norm: bool = False) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    if model_name == "mlp":
        return MLP(64, [64, 64], 10, batch_norm=batch_norm), lambda b: torch.randn(b, 1, 8, 8)
    if model_name == "cnn":
        return (LeNetCNN((1, 8, 8), [8, 16], 64, 10, batch_norm=batch_norm),
                lambda b: torch.randn(b, 1, 8, 8))
    # the char GPT of experiment=shakespeare_char (vocab 65, context 64), narrower and shallower
    return GPT(65, 64, 2, 2, 64), lambda b: torch.randint(0, 65, (b, 64))


def train(model: nn.Module, cfg: QATConfig, batch: callable, steps: int = 3) -> nn.Module:
    """Attach ``cfg`` and take a few SGD steps (+ qat_step: the observers commit a range)."""
    apply_qat(cfg, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(batch(8)).float().square().mean().backward()
        opt.step(), opt.zero_grad()
        qat_step(model)
    return model.eval()


def initializers(path: str) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(path).graph.initializer}


def ops(path: str) -> list[str]:
    return [n.op_type for n in onnx.load(path).graph.node]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "gpt"])
def test_onnxruntime_equals_fake_quant_within_one_step(name, model_name, tmp_path):
    model, batch = build(model_name)
    model = train(model, preset(name), batch)
    path = str(tmp_path / "model.onnx")
    written = export_onnx(model, batch(2), path)
    torch.manual_seed(1)
    # another batch size than the example (the batch dimension is dynamic); 8 × 64 tokens for
    # the GPT: each token row is one more chance for an fp32 rounding difference to flip a code
    x = batch(8 if model_name == "gpt" else 32)
    with torch.no_grad():
        ref = model(x)
    out = run_onnx(path, x)
    assert out.shape == ref.shape
    steps = (out - ref).abs().max().item() / output_step(ref)
    print(f"{name} {model_name}: max |diff| = {steps:.3g} output steps")
    assert steps <= 1.0
    # every quantized weight is an integer initializer, dequantized by DequantizeLinear
    types = initializers(path)
    layers = convert(model)[1]
    assert set(written["layers"]) >= set(layers)
    want = onnx.TensorProto.INT4 if name == "int8dyn_int4w" else onnx.TensorProto.INT8
    for layer in layers:
        assert types[f"{layer}.weight_q"] == want, layer
        assert f"{layer}.weight_t" not in types and f"{layer}.weight" not in types
    n_act = sum(1 for d in written["layers"].values() if "input" in d)
    assert n_act > 0
    # static: QuantizeLinear → DequantizeLinear; per token: codes by explicit ops, then
    # DequantizeLinear with one block per token
    assert ops(path).count("QuantizeLinear") == (n_act if name == "w8a8" else 0)
    assert ops(path).count("DequantizeLinear") == n_act + len(layers)
    # the integer file really quantizes: it is far from the same model without quantizers
    plain, _ = build(model_name)
    plain.load_state_dict({k.replace("parametrizations.weight.original", "weight"): v
                           for k, v in model.state_dict().items()}, strict=False)
    with torch.no_grad():
        assert (plain.eval()(x) - ref).abs().max() > 5 * (out - ref).abs().max()


def test_per_group_and_per_token_are_blocked_qdq(tmp_path):
    model, batch = build("gpt")
    model = train(model, preset("int8dyn_int4w"), batch)
    path = str(tmp_path / "model.onnx")
    export_onnx(model, batch(2), path)
    g = onnx.load(path).graph
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    w = dq["blocks.0.mlp.0.weight_t"]  # (in, out) = (64, 256), one scale per 32 inputs
    attrs = {a.name: a.i for a in w.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    scale = next(t for t in g.initializer if t.name == w.input[1])
    assert list(scale.dims) == [2, 256]
    codes = next(t for t in g.initializer if t.name == w.input[0])
    assert codes.data_type == onnx.TensorProto.INT4 and list(codes.dims) == [64, 256]
    assert len(codes.raw_data) == 64 * 256 // 2  # two codes a byte
    acts = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] not in
            {t.name for t in g.initializer}]
    assert len(acts) == 9  # 2 blocks × 4 Linear + lm_head
    assert sorted({a.name: a.i for a in n.attribute}["block_size"] for n in acts) == \
        [64] * 7 + [256] * 2  # the row: n_embd, or 4·n_embd into mlp.2
    assert all({a.name: a.i for a in n.attribute}["axis"] == -1 for n in acts)
    assert onnx.load(path).opset_import[0].version == 21


def test_bn_folded_cnn_deploys_without_batchnorm(tmp_path):
    model, batch = build("cnn", batch_norm=True)
    model = train(model, preset("w8a8"), batch)
    path = str(tmp_path / "model.onnx")
    written = export_onnx(model, batch(2), path)
    assert "features.5 folded" in written["layers"]["features.4"]
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    assert (run_onnx(path, x) - ref).abs().max().item() <= output_step(ref)
    # features.1 (first conv, fp32) keeps its BN, folded at export by the exporter or not;
    # the quantized conv's and the hidden Linear's BNs are gone
    assert ops(path).count("BatchNormalization") <= 1


def test_file_stores_integers_and_is_smaller(tmp_path):
    model, batch = build("mlp")
    fp32 = str(tmp_path / "fp32.onnx")
    export_onnx(model.eval(), batch(2), fp32)  # no quantizers: the float graph
    assert "QuantizeLinear" not in ops(fp32)
    model = train(model.train(), preset("w8a8"), batch)
    int8 = str(tmp_path / "int8.onnx")
    export_onnx(model, batch(2), int8)
    # net.2 (64×64) is stored as 4096 int8 bytes instead of 16384 fp32 bytes, plus 64 scales
    w = next(t for t in onnx.load(int8).graph.initializer if t.name == "net.2.weight_q")
    assert w.data_type == onnx.TensorProto.INT8 and len(w.raw_data) == 64 * 64
    assert 0.9 * (3 * 64 * 64 - 64 * 4) < os.path.getsize(fp32) - os.path.getsize(int8) \
        < 3 * 64 * 64


def cnn_with(weight: str, act: QuantizerConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    spec = QuantizerConfig(name=weight, **EXPORT_ARGS[weight])
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=spec, act=act or W8A8.act),
                    keep_first_last=False)
    return train(LeNetCNN((1, 8, 8), [4, 6], 12, 10), cfg, lambda b: torch.randn(b, 1, 8, 8))


@pytest.mark.parametrize("name", sorted(EXPORT_ARGS))
def test_every_weight_quantizer_exports_or_is_refused(name, tmp_path):
    """affine / affine_group / dense weights export and match; every other format is refused
    with the layer and the format named, and no file is left."""
    model = cnn_with(name)
    fmt = convert(model)[1]["features.0"]["format"]
    path = tmp_path / "model.onnx"
    if fmt in ONNX_FORMATS:
        export_onnx(model, torch.randn(2, 1, 8, 8), str(path))
        x = torch.randn(16, 1, 8, 8)
        with torch.no_grad():
            ref = model(x)
        # the graph as written computes the fake-quant model up to fp32 rounding ...
        assert (run_onnx(str(path), x, optimize=False) - ref).abs().max() <= 1e-3 * \
            output_step(ref)
        # ... and onnxruntime's integer fusions (an int32 bias at scale s_x·s_w) stay within
        # two steps even for 2-bit weights, whose s_w is coarse
        assert (run_onnx(str(path), x) - ref).abs().max() <= 2 * output_step(ref)
        return
    with pytest.raises(OnnxExportError) as e:
        export_onnx(model, torch.randn(2, 1, 8, 8), str(path))
    msg = str(e.value)
    assert msg.startswith("features.0.weight: ") and f"exports as '{fmt}'" in msg, msg
    assert "ONNX QDQ cannot express" in msg
    assert os.listdir(tmp_path) == []


def test_refusal_messages(tmp_path):
    path = str(tmp_path / "model.onnx")
    with pytest.raises(OnnxExportError, match=r"^features\.0\.weight: ttq\(.*\) exports as "
                       r"'ternary2', which ONNX QDQ cannot express"):
        export_onnx(cnn_with("ttq"), torch.randn(2, 1, 8, 8), path)
    pact = QuantizerConfig(name="pact", bits=4)
    with pytest.raises(OnnxExportError, match=r"^features\.0\.input: activation quantizer "
                       r"pact\(.*\) has no ONNX QDQ form in this export \(supported: int, uint\)"):
        export_onnx(cnn_with("int", pact), torch.randn(2, 1, 8, 8), path)
    # a static range that was never observed
    torch.manual_seed(0)
    fresh = apply_qat(QATConfig(name="t", default=W8A8, keep_first_last=False),
                      LeNetCNN((1, 8, 8), [4, 6], 12, 10)).eval()
    with pytest.raises(OnnxExportError, match=r"^features\.0\.input: uint\(bits=8.*\) has no "
                       "observed range yet"):
        export_onnx(fresh, torch.randn(2, 1, 8, 8), path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act", ["int", "uint"])
def test_static_activation_ranges(act, bits, tmp_path):
    """int's narrow range ±(2^(k−1) − 1) and k < 8 are a Clip before the 8-bit QuantizeLinear."""
    model = cnn_with("int", QuantizerConfig(name=act, bits=bits))
    path = str(tmp_path / "model.onnx")
    export_onnx(model, torch.randn(2, 1, 8, 8), path)
    x = 3 * torch.randn(64, 1, 8, 8)  # well outside the observed range: the clip matters
    with torch.no_grad():
        ref = model(x)
    assert (run_onnx(path, x) - ref).abs().max().item() <= output_step(ref)
    assert ops(path).count("Clip") == (4 if act == "int" or bits < 8 else 0)


@pytest.mark.slow
def test_export_cli_onnx(tmp_path):
    run = tmp_path / "run"
    p = run_train("qat=w8a8", "steps=10", "eval_every=0", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = [sys.executable, str(REPO / "launch" / "export.py"), str(run), "--format", "onnx"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "net.2: weight int8 per channel, input uint8 static per tensor" in p.stdout
    assert "output steps)" in p.stdout
    assert (run / "export" / "model.onnx").exists()
    assert not (run / "export" / "model.safetensors").exists()
    run2 = tmp_path / "ttq"
    p = run_train("qat=ttq", "steps=2", "eval_every=0", f"hydra.run.dir={run2}")
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([*cmd[:2], str(run2), "--format", "onnx"], capture_output=True,
                       text=True, env=clean_env(), cwd=REPO)
    assert p.returncode == 2
    assert "export: net.2.weight: ttq(" in p.stderr and "'ternary2'" in p.stderr
    assert not (run2 / "export" / "model.onnx").exists()


def test_gradient_quantizers_are_the_identity_in_the_file(tmp_path):
    torch.manual_seed(0)
    slots = QATSlotsConfig(weight=W8A8.weight, act=W8A8.act,
                           grad=QuantizerConfig(name="dorefa_g", bits=8))
    model = train(LeNetCNN((1, 8, 8), [4, 6], 12, 10),
                  QATConfig(name="t", default=slots, keep_first_last=False),
                  lambda b: torch.randn(b, 1, 8, 8))
    path = str(tmp_path / "model.onnx")
    export_onnx(model, torch.randn(2, 1, 8, 8), path)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    assert (run_onnx(path, x, optimize=False) - ref).abs().max() <= 1e-3 * output_step(ref)

"""An exported model's affine Linear layers through the packed GEMM (dqt.quant.packed_linear):
outputs match the dequantizing model within the GEMM's √K tolerance, with the Triton kernel
(the interpreter on CPU, the device on a GPU) and with the reference; other layers untouched."""

from __future__ import annotations

import pytest
import torch

from dqt.kernels import lowbit_gemm_triton
from dqt.quant import apply_qat
from dqt.quant.export.convert import load_packed
from dqt.quant.export.serialize import read_export, save_export
from dqt.quant.export.packed_linear import use_packed_gemm
from dqt.train.models import LeNetCNN
from tests.test_quant_export import trained

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["reference"] + (["triton"] if lowbit_gemm_triton.available(torch.device(DEVICE)) else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["bwn", "twn", "dorefa_w", "int", "ttq"])
def test_packed_gemm_matches_the_dequantizing_model(name, impl, tmp_path):
    model, cfg = trained(name)
    save_export(model, str(tmp_path))
    tensors, doc = read_export(str(tmp_path))
    fresh = load_packed(apply_qat(cfg, LeNetCNN((1, 8, 8), [4, 6], 12, 10)), tensors, doc)
    fresh = fresh.eval().to(DEVICE)
    x = torch.randn(32, 1, 8, 8, device=DEVICE)
    with torch.no_grad():
        ref = fresh(x)
        switched = use_packed_gemm(fresh, impl=impl)
        out = fresh(x)
    affine = name != "ttq"  # TTQ's two scales are not one affine code: it keeps its path
    assert switched == (["classifier.0", "classifier.2"] if affine else [])
    # fp32 sums in another order: a few ulps of the largest partial products, K = 96 or 12
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if affine:
        calls = []
        handle = fresh.classifier[0].register_forward_pre_hook(lambda m, a: calls.append(1))
        with torch.no_grad():
            fresh(x)
        handle.remove()
        assert calls == [1]  # the module's hooks (activation quantizers) still run

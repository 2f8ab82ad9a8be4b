"""Alternating multi-bit quantization (Xu et al., ICLR 2018): the greedy start, the
alternations lowering the error, the binary search equal to brute force, k = 1 being BWN, and
the paper's setting — the Linear layers of a recurrent/sequence model (dqt's GPT)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dqt.errors import ConfigError
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.config import to_typed
from dqt.quant import QUANTIZERS, apply_qat
from dqt.quant.methods.alternating import alternating_quantize
from dqt.train.models import GPT


def err(w, y):
    return (w - y).pow(2).sum(dim=1)


def test_alternations_never_increase_the_error_and_beat_greedy():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * 0.1
    prev = None
    for iters in range(0, 4):
        codes, table = alternating_quantize(w, 2, iters)
        e = err(w, torch.gather(table, 1, codes))
        if prev is not None:
            assert (e <= prev * (1 + 1e-5) + 1e-9).all()
        prev = e
    c0, t0 = alternating_quantize(w, 2, 0)
    greedy = err(w, torch.gather(t0, 1, c0))
    assert prev.sum() < 0.95 * greedy.sum()


def test_greedy_start_is_residual_binarization():
    w = torch.tensor([[0.9, -0.5, 0.2, -0.1]])
    codes, table = alternating_quantize(w, 2, 0)
    a1 = w.abs().mean()  # 0.425
    r = w - a1 * torch.sign(w)
    a2 = r.abs().mean()
    expected = a1 * torch.sign(w) + a2 * torch.sign(r)
    torch.testing.assert_close(torch.gather(table, 1, codes), expected)


def test_one_bit_is_bwn_per_row():
    torch.manual_seed(1)
    w = torch.randn(5, 30)
    q = QUANTIZERS.get("aqn")("weight", bits=1, iters=2)
    alpha = w.abs().mean(dim=1, keepdim=True)  # least squares for b = sign(w)
    torch.testing.assert_close(q(w), alpha * torch.where(w >= 0, 1.0, -1.0))


def test_b_step_binary_search_equals_brute_force():
    torch.manual_seed(2)
    w = torch.randn(8, 40)
    codes, table = alternating_quantize(w, 3, 2)
    y = torch.gather(table, 1, codes)
    # given the final table, every entry took the nearest of the 2^k sums
    best = (w[:, :, None] - table[:, None, :]).abs().min(dim=2).values
    torch.testing.assert_close((w - y).abs(), best)
    # and the table is the 2^k sums Σ αᵢsᵢ of some α (its sorted values pair up symmetrically)
    torch.testing.assert_close(table, -table.flip(1))
    assert len(list(itertools.product((-1, 1), repeat=3))) == table.shape[1]


def test_aqn_on_the_gpt_models_linear_layers_forward_backward():
    """The paper quantizes LSTM/GRU weight matrices — Linear maps; dqt's GPT's Linear layers are
    the same setting: every Linear gets aqn, a forward/backward step runs, every row has at most
    2^k distinct values."""
    torch.manual_seed(0)
    model = GPT(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="aqn", bits=2)),
                    types=["Linear"], keep_first_last=False)
    model = apply_qat(cfg, model)
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in lins if hasattr(m, "parametrizations")]
    assert len(quantized) >= 8  # qkv, proj, 2 MLP per block (+ the tied head)
    idx = torch.randint(0, 32, (4, 16))
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    for m in quantized:
        g = m.parametrizations.weight.original.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        w = m.weight.detach()
        assert max(len(r.unique()) for r in w.reshape(w.shape[0], -1)) <= 4


def test_bad_arguments_name_the_key(compose):
    with pytest.raises(ConfigError) as e:
        to_typed(compose("qat=aqn_w2", "qat.default.weight.bits=5"))
    assert str(e.value) == "qat.default.weight.bits: must be in [1, 4]; got 5"
    with pytest.raises(ConfigError) as e:
        QATConfig(name="t", default=QATSlotsConfig(
            weight=QuantizerConfig(name="aqn", iters=-1)))
    assert str(e.value) == "qat.default.weight.iters: must be in [0, 20]; got -1"


def test_export_is_a_codebook_of_the_row_sums(tmp_path):
    from dqt.kernels.lowbit_pack import unpack_weight
    from dqt.quant.export.serialize import read_export, save_export

    torch.manual_seed(0)
    cfg = QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name="aqn", bits=2)),
                    keep_first_last=False)
    model = apply_qat(cfg, torch.nn.Sequential(torch.nn.Linear(40, 6))).eval()
    save_export(model, str(tmp_path))
    t, doc = read_export(str(tmp_path))
    meta = doc["layers"]["0"]
    assert meta["format"] == "codebook" and meta["storage_bits"] == 2
    table, codes = t["0.weight.table"], unpack_weight(t["0.weight.packed"], 2, 40)
    assert table.shape == (6, 4) and int(codes.max()) <= 3
    assert torch.equal(torch.gather(table, 1, codes.long()), model[0].weight)
    assert not [k for k in t if "parametrizations" in k]  # no latent weight, no quantizer state

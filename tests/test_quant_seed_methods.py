"""Deep Compression weight sharing (``kmeans``), INQ (``inq``) and ShiftCNN (``shiftcnn``):
the seed's worked examples, the storage formula, Huffman code lengths, INQ's schedule, ShiftCNN's
codebooks, config errors, and 2-rank runs that keep every rank's parameters identical."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.conftest import run_train, summary
from dqt.errors import ConfigError
from dqt.quant.config import QATConfig, QATSlotsConfig, QuantizerConfig
from dqt.quant import QUANTIZERS, apply_qat, qat_step
from dqt.quant.export.codes import Dense, Log, SharedCodebook, shift_value
from dqt.quant.export.convert import convert
from dqt.quant.export.huffman import huffman_bits, huffman_code_lengths
from dqt.quant.export.summary import summarize
from dqt.quant.methods.weight_sharing import compression_ratio, init_centroids, kmeans_1d


def make(name, **args):
    return QUANTIZERS.get(name)("weight", **args)


def qat(name, fold_bn=False, **args):
    return QATConfig(name="t", default=QATSlotsConfig(weight=QuantizerConfig(name=name, **args)),
                     keep_first_last=False, fold_bn=fold_bn)


# ------------------------------------------------------------------ Deep Compression
def test_seed_clustering_example():
    """The seed's 3×3 example, k = 3: centres 1.0 (A, index 1), 6.5 (B, 2), −0.95 (C, 3) and
    its index matrix. (A's mean is 5.1/5 = 1.02; the seed prints it rounded.)"""
    w = torch.tensor([[1.2, 1.3, 6.1], [0.9, 0.7, 6.9], [-1.0, -0.9, 1.0]])
    c0 = init_centroids(w, 3, "linear")
    assert torch.allclose(c0, torch.tensor([-1.0, 2.95, 6.9], dtype=torch.float64))
    c, idx = kmeans_1d(w, c0)
    torch.testing.assert_close(c, torch.tensor([-0.95, 1.02, 6.5]))
    seed_label = {1: 1, 2: 2, 0: 3}  # our cluster (sorted init) -> the seed's index
    labels = [[seed_label[int(i)] for i in row] for row in idx]
    assert labels == [[1, 1, 2], [1, 1, 2], [3, 3, 1]]


def test_centroid_initializations():
    w = torch.tensor([16.0, 1.0, 8.0, 2.0, 4.0])
    assert init_centroids(w, 3, "linear").tolist() == [1.0, 8.5, 16.0]
    # density: equal steps on the CDF's y axis -> order statistics at (n−1)·j/(k−1), interpolated
    assert init_centroids(w, 3, "density").tolist() == [1.0, 4.0, 16.0]
    d = init_centroids(w, 4, "density").tolist()
    assert d == pytest.approx([1.0, 2 + 2 / 3, 4 + 8 / 3, 16.0])
    x = torch.arange(50.0)
    r = init_centroids(x, 8, "random")
    assert torch.equal(r, init_centroids(x, 8, "random"))  # seeded: identical on every rank
    assert len(set(r.tolist())) == 8 and set(r.tolist()) <= set(x.tolist())  # 8 distinct weights
    few = init_centroids(torch.arange(3.0), 5, "random")  # k > n: every weight, then repeats
    assert few.shape == (5,) and set(few.tolist()) == {0.0, 1.0, 2.0}


def test_kmeans_reduces_the_within_cluster_sum_of_squares():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    c0 = init_centroids(w, 8, "linear")
    wcss0 = (w.double().reshape(-1, 1) - c0).abs().min(1).values.square().sum()
    c, idx = kmeans_1d(w, c0)
    wcss = (w - c[idx]).double().square().sum()
    assert wcss < 0.8 * wcss0
    # a fixed point: every weight at its nearest centroid, every centroid its cluster's mean
    assert torch.equal(idx, (w.reshape(-1, 1) - c).abs().argmin(1).reshape(w.shape))
    for j in idx.unique():
        assert float(c[j]) == pytest.approx(float(w[idx == j].double().mean()), rel=1e-6)


def test_seed_compression_ratio_example():
    """r = 32n / (n·log2 k + 32k); the seed: 8 bits, k = 256: r = 32n/(8n + 256·32) ≈ 4."""
    for n in (1000, 65536, 10 ** 7):
        assert compression_ratio(n, 256) == 32 * n / (8 * n + 256 * 32)
    assert 3.99 < compression_ratio(2 ** 30, 256) < 4
    assert compression_ratio(1000, 16) == 32 * 1000 / (4 * 1000 + 16 * 32)


@pytest.mark.parametrize("bits", [4, 8])
def test_export_size_is_index_bits_plus_codebook(bits):
    """The export's bytes for a shared layer are n·log2(k)/8 + 4k, so fp32/export = r."""
    torch.manual_seed(0)
    model = apply_qat(qat("kmeans", bits=bits), nn.Sequential(nn.Linear(64, 32, bias=False)))
    rows = summarize(model)["layers"]
    n, k = 64 * 32, 2 ** bits
    assert rows[0]["format"] == "shared_codebook" and rows[0]["bytes"] == n * bits // 8 + 4 * k
    assert rows[0]["fp32_bytes"] / rows[0]["bytes"] == compression_ratio(n, k)
    _, layers = convert(model)
    assert layers["0"]["clusters"] == k


def test_huffman_code_lengths_by_hand():
    # CLRS 16.3: a:45 b:13 c:12 d:16 e:9 f:5 -> a 1, b c d 3, e f 4 (224 bits)
    assert huffman_code_lengths([45, 13, 12, 16, 9, 5]) == [1, 3, 3, 3, 4, 4]
    assert huffman_bits([45, 13, 12, 16, 9, 5]) == 45 + 3 * (13 + 12 + 16) + 4 * (9 + 5)
    # dyadic 1/2, 1/4, 1/8, 1/8 -> 1, 2, 3, 3; unused symbols get no code; one symbol: 1 bit
    assert huffman_code_lengths([4, 0, 2, 1, 1]) == [1, 0, 2, 3, 3]
    assert huffman_code_lengths([0, 7, 0]) == [0, 1, 0]
    assert huffman_code_lengths([5, 5, 5, 5]) == [2, 2, 2, 2]
    # Kraft equality for a full binary tree
    counts = [50, 1, 3, 7, 7, 20, 2, 90]
    assert sum(2.0 ** -n for n in huffman_code_lengths(counts)) == 1.0


def test_codebook_export_reports_the_huffman_size():
    q = make("kmeans", bits=2)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    q.init_from(w)
    codes = q.encode(w)
    assert isinstance(codes, SharedCodebook) and torch.equal(codes.decode(), q(w).detach())
    counts = torch.bincount(q.index.reshape(-1).long(), minlength=4).tolist()
    assert codes.meta()["huffman_bits"] == huffman_bits(counts) <= 2 * w.numel()


def test_kmeans_clusters_once_at_cluster_step_and_trains_only_centroids():
    torch.manual_seed(0)
    model = apply_qat(qat("kmeans", bits=3, cluster_step=2), nn.Sequential(nn.Linear(12, 6)))
    q = model[0].parametrizations.weight[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 12)
    for step in range(1, 5):
        w_before = model[0].weight.detach().clone()
        model(x).square().mean().backward()
        opt.step(), opt.zero_grad()
        qat_step(model)
        if step == 1:  # full precision so far: the layer's weight is its own, trained
            assert not bool(q.clustered) and isinstance(q.encode(model[0].weight), Dense)
            assert not torch.equal(model[0].weight.detach(), w_before)
        if step == 2:
            assert bool(q.clustered)
            idx = q.index.clone()
            orig = model[0].parametrizations.weight.original.detach()
            c, i = kmeans_1d(orig, init_centroids(orig, 8, "linear"))
            assert torch.equal(q.index.long(), i) and torch.equal(q.centroids.detach(), c)
    assert torch.equal(q.index, idx)  # the assignment never changes again
    w = model[0].weight.detach()
    assert len(w.unique()) <= 8 and torch.equal(w, q.centroids.detach()[q.index.long()])


def test_state_based_quantizers_refuse_bn_folding():
    from dqt.train.models import LeNetCNN

    for name in ("kmeans", "inq"):
        with pytest.raises(ValueError, match="qat.fold_bn"):
            apply_qat(qat(name, fold_bn=True), LeNetCNN((1, 8, 8), [4, 6], 12, 10, batch_norm=True))


@pytest.mark.parametrize("args,key", [
    ({"bits": 9}, "bits"), ({"centroid_init": "kmeans++"}, "centroid_init"),
    ({"cluster_step": -1}, "cluster_step")])
def test_kmeans_config_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=rf"^qat\.default\.weight\.{key}: "):
        qat("kmeans", **args)


@pytest.mark.parametrize("args,key", [
    ({"schedule": [0.5, 0.25]}, "schedule"), ({"schedule": [0.5, 1.5]}, "schedule"),
    ({"schedule": []}, "schedule"), ({"stage_steps": 0}, "stage_steps"), ({"bits": 1}, "bits")])
def test_inq_config_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=rf"^qat\.default\.weight\.{key}: "):
        qat("inq", **args)


@pytest.mark.parametrize("args,key", [({"bits": 1}, "bits"), ({"terms": 0}, "terms")])
def test_shiftcnn_config_errors_name_the_key(args, key):
    with pytest.raises(ConfigError, match=rf"^qat\.default\.weight\.{key}: "):
        qat("shiftcnn", **args)


# ------------------------------------------------------------------ INQ
def test_inq_schedule_freezes_largest_first_and_frozen_weights_never_change():
    torch.manual_seed(0)
    model = apply_qat(qat("inq", bits=5, schedule=[0.0, 0.5, 0.75, 0.875, 1.0], stage_steps=2),
                      nn.Sequential(nn.Linear(16, 8)))
    q = model[0].parametrizations.weight[0]
    # weight decay and momentum would move a frozen weight if only its gradient were zeroed
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x = torch.randn(32, 16)
    assert int(q.frozen.sum()) == 0 and torch.isnan(q.n1)  # stage 0: full precision
    shares, frozen_vals = [], {}
    for step in range(1, 11):
        model(x).square().mean().backward()
        opt.step(), opt.zero_grad()
        if step == 2:
            orig = model[0].parametrizations.weight.original.detach().clone()
        qat_step(model)
        w = model[0].weight.detach()
        shares.append(float(q.frozen.float().mean()))
        for i in q.frozen.nonzero().tolist():
            v = float(w[tuple(i)])
            assert frozen_vals.setdefault(tuple(i), v) == v  # frozen: never changes
            assert v == 0 or math.log2(abs(v)) == round(math.log2(abs(v)))  # a power of two
        if step == 2:  # the first quantized half: the 64 largest |W| at that step, on P
            assert torch.equal(q.frozen, orig.abs() >= orig.abs().flatten().kthvalue(65).values)
            assert float(q.n1) == math.floor(math.log2(4 * float(orig.abs().max()) / 3))
    assert shares == [0.0, 0.5, 0.5, 0.75, 0.75, 0.875, 0.875, 1.0, 1.0, 1.0]
    w = model[0].weight.detach()
    n1 = float(q.n1)
    levels = {0.0} | {2.0 ** e for e in range(int(n1) - 7, int(n1) + 1)}
    assert set(w.abs().unique().tolist()) <= levels
    codes = q.encode(w)
    assert isinstance(codes, Log) and torch.equal(codes.decode(), w.reshape(8, -1))


def test_inq_state_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = qat("inq", schedule=[0.5, 0.75, 1.0], stage_steps=1)
    a = apply_qat(cfg, nn.Sequential(nn.Linear(16, 8)))
    a[0].parametrizations.weight[0].after_step(a[0].parametrizations.weight.original)
    torch.manual_seed(1)
    b = apply_qat(cfg, nn.Sequential(nn.Linear(16, 8)))
    b.load_state_dict(a.state_dict())
    qa, qb = a[0].parametrizations.weight[0], b[0].parametrizations.weight[0]
    assert int(qb.stage) == 1 and int(qb.steps) == 1
    assert torch.equal(qa.frozen, qb.frozen) and torch.equal(a[0].weight, b[0].weight)


# ------------------------------------------------------------------ ShiftCNN
def test_shiftcnn_codebooks_have_m_codewords():
    """B = 4, N = 2: C_1 = {0, ±2^0..±2^−6}, C_2 = {0, ±2^−1..±2^−7}: M = 15 codewords each."""
    codes = torch.arange(15, dtype=torch.uint8)
    c1, c2 = shift_value(codes, 1, 4), shift_value(codes, 2, 4)
    pos1 = {2.0 ** -e for e in range(0, 7)}
    pos2 = {2.0 ** -e for e in range(1, 8)}
    assert set(c1.tolist()) == {0.0} | pos1 | {-v for v in pos1} and len(set(c1.tolist())) == 15
    assert set(c2.tolist()) == {0.0} | pos2 | {-v for v in pos2} and len(set(c2.tolist())) == 15


def test_shiftcnn_by_hand():
    """r = w / max|w| = w here; greedy nearest powers of two (border 1.5·2^k):
    0.75 = 2^−1 + 2^−2; 0.3 → 2^−2 then residual 0.05 → 2^−4: 0.3125; −0.6 → −2^−1 − 2^−3;
    0.01 is below C_1 (2^−7 < 2^−6) but in C_2: 2^−7."""
    q = make("shiftcnn")
    w = torch.tensor([[1.0, 0.75, 0.3, -0.6, 0.01]])
    y = q(w)
    assert y.tolist() == [[1.0, 0.75, 0.3125, -0.625, 2.0 ** -7]]
    assert torch.equal(make("shiftcnn")(3 * w), 3 * y)  # scale by max|W|
    codes = q.encode(w)
    assert codes.codes[0, 0].tolist() == [1, 2, 3, 9, 0]  # C_1 index j = 1 − k; negative +7
    assert torch.equal(codes.decode(), y)
    # one term: 0.3 → 0.25, 0.01 → 0 (below C_1)
    assert make("shiftcnn", terms=1)(w).tolist() == [[1.0, 0.5, 0.25, -0.5, 0.0]]


def test_shiftcnn_error_shrinks_with_terms():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    errs = [float((make("shiftcnn", terms=n)(w) - w).square().mean()) for n in (1, 2, 3)]
    assert errs[0] > 4 * errs[1] > 16 * errs[2] > 0


# ------------------------------------------------------------------ 2 ranks end to end
@pytest.mark.parametrize("overrides", [
    ["qat=inq", "qat.default.weight.stage_steps=6"],
    ["qat=kmeans", "qat.default.weight.cluster_step=10"]], ids=["inq", "kmeans"])
def test_two_rank_run_keeps_parameters_identical(tmp_path, overrides):
    p = run_train("experiment=digits_cnn_bn", *overrides, "steps=40", "eval_every=0",
                  f"hydra.run.dir={tmp_path}", nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "params identical on all ranks: True" in (tmp_path / "train_rank0.log").read_text()
    s = summary(tmp_path)
    assert s["params_in_sync"] and s["eval/acc"] > 0.5

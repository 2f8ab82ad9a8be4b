"""Tests for dqt.train.data: real file formats written to tmp_path, no mocks."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time

import numpy as np
import pytest
import torch

from dqt.errors import ConfigError
from dqt.config import CIFAR10Config, DigitsConfig, MNISTConfig, SyntheticConfig, TextConfig
from dqt.train.data import (CIFAR10_MEAN, CIFAR10_STD, DATASETS, MNIST_MEAN, MNIST_STD,
                            ShardedLoader, TensorSplit, build_dataset, default_corpus, eval_shard)


def test_registry_names():
    assert DATASETS.names() == ["cifar10", "digits", "mnist", "shakespeare", "sort", "synthetic",
                                "text"]
    with pytest.raises(KeyError, match="data.name"):
        DATASETS.get("imagenet")


# --------------------------------------------------------------------------- digits
def test_digits_shapes_and_split():
    ds = build_dataset(DigitsConfig())
    assert len(ds.train) + len(ds.test) == 1797
    assert len(ds.test) == round(1797 * 0.2)
    assert ds.meta.task == "classify" and ds.meta.input_shape == (1, 8, 8) and ds.meta.num_classes == 10
    x, y = ds.train.batch(torch.arange(len(ds.train)))
    xt, yt = ds.test.batch(torch.arange(len(ds.test)))
    assert x.shape == (len(ds.train), 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert set(y.tolist()) == set(range(10))
    # train ∪ test is exactly the 1797 images (as a multiset), so the split is a partition:
    # normalization is affine with a scalar scale and raw pixels span 0..16, so invert via min/max
    from collections import Counter

    from sklearn.datasets import load_digits
    d = load_digits()
    both = torch.cat([x, xt]).view(1797, -1)
    recon = torch.round((both - both.min()) / (both.max() - both.min()) * 16).to(torch.int64)
    rows = Counter((tuple(r), int(c)) for r, c in zip(recon.tolist(), torch.cat([y, yt]).tolist()))
    want = Counter((tuple(r), int(c)) for r, c in zip(d.images.reshape(1797, -1).astype(int).tolist(),
                                                       d.target.tolist()))
    assert rows == want
    # deterministic; another split_seed gives another split
    again = build_dataset(DigitsConfig())
    assert torch.equal(again.test.batch(torch.arange(len(ds.test)))[0], xt)
    other = build_dataset(DigitsConfig(split_seed=1))
    assert not torch.equal(other.test.batch(torch.arange(len(other.test)))[0], xt)


# --------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_seeded():
    cfg = SyntheticConfig(num_train=500, num_test=100, input_shape=[4, 4], num_classes=3)
    a, b = build_dataset(cfg), build_dataset(cfg)
    assert a.meta.input_shape == (4, 4) and a.meta.num_classes == 3
    for sa, sb in [(a.train, b.train), (a.test, b.test)]:
        xa, ya = sa.batch(torch.arange(len(sa)))
        xb, yb = sb.batch(torch.arange(len(sb)))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (100, 4, 4) and xa.dtype == torch.float32 and ya.dtype == torch.int64
    c = build_dataset(SyntheticConfig(num_train=500, num_test=100, input_shape=[4, 4],
                                      num_classes=3, seed=99))
    assert not torch.equal(c.train.batch(torch.arange(500))[0], a.train.batch(torch.arange(500))[0])


def test_synthetic_learnable_and_fast():
    t = time.perf_counter()
    ds = build_dataset(SyntheticConfig(num_train=200_000, num_test=1000, input_shape=[64]))
    assert time.perf_counter() - t < 2.0  # ~0.25 s on 2 cores; slack for a loaded machine
    assert len(ds.train) == 200_000
    # nearest-class-mean classifier from train means beats chance by a wide margin but isn't perfect
    x, y = ds.train.batch(torch.arange(20_000))
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    xt, yt = ds.test.batch(torch.arange(1000))
    acc = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert 0.5 < acc < 0.999


# --------------------------------------------------------------------------- cifar10
def _write_cifar(d, n=20, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        out[name] = (data, labels)
    return out


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar10_roundtrip(tmp_path, sub):
    written = _write_cifar(tmp_path / sub if sub else tmp_path)
    ds = build_dataset(CIFAR10Config(root=str(tmp_path)))
    assert ds.meta.input_shape == (3, 32, 32) and ds.meta.num_classes == 10
    assert len(ds.train) == 100 and len(ds.test) == 20
    x, y = ds.train.batch(torch.arange(100))
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(100, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    back = torch.round((x * std + mean) * 255)
    assert torch.equal(back.to(torch.uint8), torch.from_numpy(raw))
    assert y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # channel planes: pixel (c=1, h=2, w=3) of image 0 is byte 1*1024 + 2*32 + 3 of its row
    assert back[0, 1, 2, 3].item() == written["data_batch_1"][0][0, 1024 + 64 + 3]
    xt, yt = ds.test.batch(torch.tensor([19, 0]))
    assert yt.tolist() == [written["test_batch"][1][19], written["test_batch"][1][0]]


def test_cifar10_missing(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_dataset(CIFAR10Config(root=str(tmp_path / "nope")))
    msg = str(e.value)
    assert msg.startswith("data.root: ") and "data_batch_1" in msg and "nope" in msg
    assert "never download" in msg and "cifar-10-python.tar.gz" in msg and "cifar.html" in msg
    assert "data.root=PATH" in msg
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    del written
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(ConfigError, match="test_batch") as e:
        build_dataset(CIFAR10Config(root=str(tmp_path)))
    assert "cifar-10-batches-py" in str(e.value)


# --------------------------------------------------------------------------- mnist
def _idx(data: np.ndarray, magic: int) -> bytes:
    return struct.pack(">i", magic) + struct.pack(f">{data.ndim}i", *data.shape) + data.tobytes()


def _write_mnist(d, gz, n_train=12, n_test=7, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        arrays[f"{prefix}-images-idx3-ubyte"] = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 2051)
        arrays[f"{prefix}-labels-idx1-ubyte"] = (rng.integers(0, 10, n, dtype=np.uint8), 2049)
    for name, (a, magic) in arrays.items():
        blob = _idx(a, magic)
        if gz:
            with gzip.open(d / (name + ".gz"), "wb") as f:
                f.write(blob)
        else:
            (d / name).write_bytes(blob)
    return {k: v[0] for k, v in arrays.items()}


@pytest.mark.parametrize("gz,sub", [(False, ""), (True, ""), (True, "MNIST/raw")])
def test_mnist_roundtrip(tmp_path, gz, sub):
    arr = _write_mnist(tmp_path / sub if sub else tmp_path, gz)
    ds = build_dataset(MNISTConfig(root=str(tmp_path)))
    assert ds.meta.input_shape == (1, 28, 28) and ds.meta.num_classes == 10
    assert len(ds.train) == 12 and len(ds.test) == 7
    for split, prefix in [(ds.train, "train"), (ds.test, "t10k")]:
        x, y = split.batch(torch.arange(len(split)))
        assert x.shape == (len(split), 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        back = torch.round((x * MNIST_STD + MNIST_MEAN) * 255).to(torch.uint8)
        assert torch.equal(back[:, 0], torch.from_numpy(arr[f"{prefix}-images-idx3-ubyte"]))
        assert y.tolist() == arr[f"{prefix}-labels-idx1-ubyte"].tolist()


def test_mnist_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_dataset(MNISTConfig(root=str(tmp_path)))
    msg = str(e.value)
    assert msg.startswith("data.root: ") and "train-images-idx3-ubyte" in msg
    assert str(tmp_path) in msg and "never download" in msg and "data.root=PATH" in msg
    arr = _write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(arr["t10k-labels-idx1-ubyte"], 2051))
    with pytest.raises(ConfigError) as e:
        build_dataset(MNISTConfig(root=str(tmp_path)))
    msg = str(e.value)
    assert msg.startswith("data.root: ") and "t10k-labels-idx1-ubyte" in msg and "2049" in msg


# --------------------------------------------------------------------------- text
def test_text_default_corpus():
    cfg = TextConfig(block_size=16, max_chars=50_000)
    ds = build_dataset(cfg)
    text = default_corpus(50_000)
    assert len(text) == 50_000
    assert ds.vocab == "".join(sorted(set(text))) and ds.meta.num_classes == len(ds.vocab)
    assert ds.meta.task == "lm" and ds.meta.input_shape == (16,)
    n_test = int(50_000 * 0.1)
    assert len(ds.train) == (50_000 - n_test - 1) // 16 and len(ds.test) == (n_test - 1) // 16
    x, y = ds.train.batch(torch.tensor([0, 3]))
    assert x.dtype == torch.int64 and x.shape == (2, 16) and y.shape == (2, 16)
    assert "".join(ds.vocab[i] for i in x[0].tolist()) == text[:16]
    assert "".join(ds.vocab[i] for i in y[1].tolist()) == text[49:65]
    xt, _ = ds.test.batch(torch.tensor([0]))
    assert "".join(ds.vocab[i] for i in xt[0].tolist()) == text[50_000 - n_test:][:16]


def test_text_file_windows(tmp_path):
    text = "".join(chr(0x61 + (i * 7) % 26) for i in range(1000)) + "é∑\n"
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    ds = build_dataset(TextConfig(path=str(p), block_size=8, max_chars=2000, test_fraction=0.2))
    assert set(ds.vocab) == set(text) and list(ds.vocab) == sorted(ds.vocab)
    n = len(ds.train)
    assert n == (len(text) - int(len(text) * 0.2) - 1) // 8
    x, y = ds.train.batch(torch.arange(n))
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal(x[1:, 0], y[:-1, -1])  # windows are consecutive, non-overlapping
    decoded = "".join(ds.vocab[i] for i in x.flatten().tolist())
    assert decoded == text[: n * 8]
    xt, yt = ds.test.batch(torch.arange(len(ds.test)))
    tail = text[len(text) - int(len(text) * 0.2):]
    assert "".join(ds.vocab[i] for i in yt.flatten().tolist()) == tail[1: 1 + len(ds.test) * 8]


def test_text_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_dataset(TextConfig(path=str(tmp_path / "missing.txt")))
    assert str(e.value).startswith("data.path: ") and "missing.txt" in str(e.value)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc" * 100)
    with pytest.raises(ConfigError, match="data.path: .*UTF-8"):
        build_dataset(TextConfig(path=str(tmp_path / "bin.txt")))
    p = tmp_path / "short.txt"
    p.write_text("abc" * 10, encoding="utf-8")
    with pytest.raises(ConfigError, match="data.path"):
        build_dataset(TextConfig(path=str(p), block_size=8))


# --------------------------------------------------------------------------- loader
def _ids(n):
    return TensorSplit(torch.arange(n), torch.arange(n))


def _take(loader, k):
    it = iter(loader)
    return [next(it)[0] for _ in range(k)]


@pytest.mark.parametrize("n,ws,bs", [(103, 1, 10), (103, 2, 8), (100, 3, 7), (64, 4, 16)])
def test_loader_shards_disjoint(n, ws, bs):
    loaders = [ShardedLoader(_ids(n), bs, r, ws, seed=5) for r in range(ws)]
    spe = loaders[0].steps_per_epoch
    assert spe == (n // ws) // bs >= 1
    seen = [torch.cat(_take(ld, spe)) for ld in loaders]
    for b in _take(loaders[0], spe):
        assert b.shape == (bs,)
    allidx = torch.cat(seen)
    assert len(allidx) == ws * spe * bs == len(set(allidx.tolist()))


def test_loader_deterministic_and_epochs():
    a = _take(ShardedLoader(_ids(50), 8, 1, 2, seed=3), 9)
    b = _take(ShardedLoader(_ids(50), 8, 1, 2, seed=3), 9)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = _take(ShardedLoader(_ids(50), 8, 1, 2, seed=4), 9)
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    # epochs reshuffle: epoch 0 and epoch 1 (3 steps each) differ
    assert not torch.equal(torch.cat(a[:3]), torch.cat(a[3:6]))


@pytest.mark.parametrize("n,ws", [(50, 1), (50, 2), (103, 3), (64, 4)])
def test_loader_epoch_indices_are_the_samplers(n, ws):
    from torch.utils.data import DistributedSampler

    for rank in range(ws):
        loader = ShardedLoader(_ids(n), 4, rank, ws, seed=7)
        sampler = DistributedSampler(_ids(n), num_replicas=ws, rank=rank, shuffle=True, seed=7,
                                     drop_last=True)
        for epoch in (0, 1, 5):
            sampler.set_epoch(epoch)
            assert loader.epoch_indices(epoch).tolist() == list(iter(sampler))


@pytest.mark.parametrize("k", [0, 1, 3, 4, 7])
def test_loader_resume(k):
    split = _ids(50)  # ws=2 → 25 per rank, bs 8 → 3 steps per epoch
    fresh = _take(ShardedLoader(split, 8, 0, 2, seed=11), k + 5)
    resumed = _take(ShardedLoader(split, 8, 0, 2, seed=11, start_step=k), 5)
    assert all(torch.equal(u, v) for u, v in zip(fresh[k:], resumed))


def test_loader_yields_labels_and_batches():
    ds = build_dataset(SyntheticConfig(num_train=40, num_test=10))
    x, y = next(iter(ShardedLoader(ds.train, 4, 0, 1, seed=0)))
    assert x.shape == (4, 64) and y.shape == (4,)


def test_loader_too_few_samples():
    with pytest.raises(ConfigError) as e:
        ShardedLoader(_ids(30), 16, 0, 4, seed=0)
    msg = str(e.value)
    assert msg.startswith("data.batch_size: ") and "30" in msg and "4" in msg and "16" in msg


# --------------------------------------------------------------------------- eval shard
@pytest.mark.parametrize("ws", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 10, 11, 101])
def test_eval_shard_covers(n, ws):
    shards = [eval_shard(n, r, ws) for r in range(ws)]
    for s in shards:
        if len(s) > 1:
            assert torch.equal(s, torch.arange(s[0], s[0] + len(s)))  # contiguous
    assert torch.equal(torch.cat(shards), torch.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ------------------------------------------------------------------ data=sort
def test_sort_samples_are_a_function_of_their_index_and_targets_are_sorted():
    from dqt.train.data import SortConfig

    ds = DATASETS.get("sort")(SortConfig(seq_len=16, vocab=10, num_train=1000, num_test=50))
    assert ds.meta.task == "tokens" and ds.meta.num_classes == 10 and ds.meta.input_shape == (16,)
    idx = torch.tensor([3, 999, 0, 3])
    x, y = ds.train.batch(idx)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[0], x[3]) and not torch.equal(x[0], x[1])  # same index, same sample
    assert torch.equal(y, x.sort(dim=1).values) and int(x.min()) >= 0 and int(x.max()) < 10
    # every value appears about equally often (a uniform hash): chi-square, 9 dof, p ≈ 0.001
    counts = torch.bincount(ds.train.batch(torch.arange(1000))[0].flatten(), minlength=10)
    expected = 16 * 1000 / 10
    assert float(((counts - expected) ** 2 / expected).sum()) < 27.9
    # validation samples are other indices of the same stream, not training samples
    tx, _ = ds.test.batch(torch.arange(50))
    assert not any(torch.equal(tx[i], t) for i in range(50)
                   for t in ds.train.batch(torch.arange(50))[0])


@pytest.mark.parametrize("key,value,message", [
    ("seq_len", 1, "data.seq_len: must be > 1; got 1"),
    ("vocab", 1, "data.vocab: must be in [2, 65536]; got 1"),
    ("num_test", 0, "data.num_test: must be > 0; got 0")])
def test_sort_bad_values_name_the_key(key, value, message):
    from dqt.train.data import SortConfig

    with pytest.raises(ConfigError) as e:
        SortConfig(**{key: value})
    assert str(e.value) == message

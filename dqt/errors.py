"""The one error type of bad configuration, and the checks that raise it.

Every component validates its own config where the config is defined and raises
:class:`ConfigError` with the full key of the value to change (``optim.lr``,
``scheme.block_size``, ``qat.rules[2].weight.bits``), before any work starts. This module is a
leaf: it imports nothing from dqt.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad config value; the message starts with the full key, e.g. ``optim.lr: ...``."""

    def __init__(self, key: str, msg: str) -> None:
        self.key = key
        super().__init__(f"{key}: {msg}")


def check(ok: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError(key, msg)`` unless ``ok``."""
    if not ok:
        raise ConfigError(key, msg)


def check_bool(value: Any, key: str) -> None:
    """Hydra rejects a non-boolean from YAML/CLI; this catches one set from Python."""
    check(isinstance(value, bool), key, f"must be true or false; got {value!r}")


def check_choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    """``value`` must be one of ``allowed`` (the message lists them in order)."""
    check(value in allowed, key, f"must be one of {', '.join(allowed)}; got '{value}'")


def first_lines(e: BaseException, n: int = 3) -> str:
    """The first ``n`` non-empty lines of an exception's message, joined with "; "."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return "; ".join(lines[:n]) + (" ..." if len(lines) > n else "")


class NoSpace(RuntimeError):
    """A write failed because the device is full; the message names the file, the space it
    needed and what was kept (the partial write is removed)."""


def no_space(e: BaseException) -> bool:
    """Did ``e`` come from a full disk? (``OSError`` ENOSPC, or the message torch's writer
    gives for it: ``basic_ios::clear: iostream error`` / ``unexpected pos``.)"""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left" in text or "iostream error" in text or "unexpected pos" in text


class PeerLost(RuntimeError):
    """A collective failed because a peer stopped answering (timed out, or its connection was
    lost); the message names this rank, the step and the ranks whose heartbeat stopped."""


class TrainingDiverged(RuntimeError):
    """The loss became non-finite: training stopped before the step that would have written
    non-finite parameters (the message names the step, the ranks and the last checkpoint)."""


def check_finite_floats(obj: Any, prefix: str = "") -> None:
    """Every float field of the dataclass ``obj`` (recursively, lists included) must be finite:
    ``inf``/``nan`` in a config is a :class:`ConfigError` naming its full key."""
    import dataclasses
    import math

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            check_finite_floats(getattr(obj, f.name), f"{prefix}{f.name}.")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite_floats(v, f"{prefix.rstrip('.')}[{i}].")
        return
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(prefix.rstrip("."), f"must be a finite number; got {obj}")


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

"""A name → builder registry (torchtitan/fairseq style): duplicate names are an error, an
unknown name lists what is available and names the config key to change."""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    def __init__(self, key: str) -> None:
        self.key = key  # the config key whose value selects an entry, e.g. "scheme.name"
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.key}: '{name}' is registered twice")
            self._entries[name] = fn
            return fn

        return deco

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"{self.key}: unknown '{name}'; available: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

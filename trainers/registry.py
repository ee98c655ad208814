"""A registry per kind (losses, heads, TTA views, augmentations), timm-style: each kind has one name list.

A kind's module registers its entries where they are defined; config validation, the CLI and the ensemble
read the allowed names from the registry, so adding a loss or a TTA view is one change in one place and
no list of names can fall out of step with what the code can build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from trainers.errors import FoldtuneError

T = TypeVar("T")


class UnknownName(FoldtuneError, ValueError):
    """A name no entry of a registry has; the message lists the names it does have."""


class Registry(Generic[T]):
    """Names to entries of one kind, in registration order (the order builders are applied in)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Callable[[T], T] | T:
        """``REGISTRY.register("name", entry)``, or ``@REGISTRY.register("name")`` over a definition."""
        if entry is not None:
            return self._add(name, entry)
        return lambda item: self._add(name, item)

    def _add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(
                f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def unknown(self, names) -> list[str]:
        """Those of ``names`` that are not registered, in the order given."""
        return [name for name in names if name not in self._entries]

    def check(self, names) -> None:
        """Raise ``UnknownName`` listing every one of ``names`` that is not registered."""
        unknown = self.unknown(names)
        if unknown:
            raise UnknownName(f"unknown {self.kind}(s) {unknown}; known: {list(self.names())}")

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

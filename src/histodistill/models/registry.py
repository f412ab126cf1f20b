"""A small registry of namespaced names (``pathology/uni``, ``tiny/resnet18-64``) that refuses duplicates.

Names are ``namespace/name`` in lower case, so a typo cannot silently shadow an existing entry
and ``list()`` reads as a catalogue. Used for backbones; any other catalogue can reuse it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*/[a-z0-9][a-z0-9._-]*$")


class Registry(Generic[T]):
    """Maps ``namespace/name`` to an object. ``register(name, obj)`` or ``@register(name)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name``; without ``obj``, return a decorator that does it."""
        if obj is None:
            return lambda decorated: self.register(name, decorated)
        if not _NAME.match(name):
            raise ValueError(
                f"{self.kind} name {name!r} must look like 'namespace/name' (lower case, no spaces)"
            )
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        return self._entries[name]

    def list(self, namespace: str | None = None) -> list[str]:
        """Sorted names, optionally only those in ``namespace``."""
        return sorted(n for n in self._entries if namespace is None or n.startswith(f"{namespace}/"))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

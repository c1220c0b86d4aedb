"""One small registry type for everything chosen by name.

Methods, allocators, adapters, optimisers and training regimes each keep one
:class:`Registry`. The CLI takes its ``choices`` from :meth:`Registry.names`, so a
name is typed once, where the thing is registered. Registries may load their
built-in entries lazily (``loader``) so importing a registry costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rankwise.errors import RankwiseError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind, with a one-line error for an unknown name.

    ``kind`` names the kind in errors ("method", "allocation", ...). ``loader`` is
    called once, before the first lookup, to import the modules that register the
    built-in entries. ``names`` may be given up front (``builtin``) so the CLI can
    list choices without importing the (heavy) implementations.
    """

    def __init__(self, kind: str, loader: Callable[[], None] | None = None,
                 builtin: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._loader = loader
        self._loaded = loader is None
        self._entries: dict[str, T] = {}
        self._builtin = tuple(builtin)

    def register(self, name: str, entry: T | None = None):
        """``reg.register("x", obj)``, or as a decorator ``@reg.register("x")``."""
        if entry is not None:
            self._entries[name] = entry
            return entry

        def deco(obj: T) -> T:
            self._entries[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded and self._loader is not None:
            self._loaded = True
            self._loader()

    def names(self) -> tuple[str, ...]:
        """All names, built-in first (without importing implementations when ``builtin`` was given)."""
        extra = tuple(n for n in self._entries if n not in self._builtin)
        if self._builtin:
            return self._builtin + extra
        self._load()
        return tuple(self._entries)

    def check(self, name: str) -> str:
        """``name`` if registered, else a one-line :class:`RankwiseError` listing the choices."""
        if name not in self.names():
            raise RankwiseError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}.")
        return name

    def get(self, name: str) -> T:
        """The entry registered as ``name``."""
        self.check(name)
        self._load()
        try:
            return self._entries[name]
        except KeyError:  # a builtin name whose module did not register it: a bug, not a user error
            raise LookupError(f"{self.kind} {name!r} is listed as built in but was never registered") from None

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

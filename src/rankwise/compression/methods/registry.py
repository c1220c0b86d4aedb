"""Methods by name: ``register`` adds one, ``get_method`` finds one (with a one-line error)."""

from __future__ import annotations

from rankwise.compression.methods.base import Method
from rankwise.errors import RankwiseError

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under its name (replacing any previous one)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``."""
    _load_builtins()
    try:
        return METHODS[name]
    except KeyError:
        raise RankwiseError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}.") from None


def _load_builtins() -> None:
    from rankwise.compression.methods import asvd, fwsvd, svd, whiten  # noqa: F401

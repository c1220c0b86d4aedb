"""Methods by name, in one :class:`rankwise.registry.Registry`: ``register`` adds one, ``get_method`` finds one."""

from __future__ import annotations

from rankwise.compression.methods.base import Method
from rankwise.registry import Registry


def _load_builtins() -> None:
    from rankwise.compression.methods import asvd, fwsvd, modegpt, svd, whiten  # noqa: F401


METHODS: Registry[Method] = Registry("method", loader=_load_builtins,
                                    builtin=("svd", "asvd", "fwsvd", "whiten", "modegpt"))


def register(method: Method) -> Method:
    """Add ``method`` to the registry under its name (replacing any previous one)."""
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    """The registered method ``name`` (a one-line :class:`RankwiseError` listing the choices otherwise)."""
    return METHODS.get(name)

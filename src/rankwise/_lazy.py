"""Public names imported on first access (PEP 562), for packages that must import cheaply.

``rankwise``, ``rankwise.io`` and ``rankwise.engine`` list their public names in a table
``name → module`` (the attribute has the same name) or ``name → (module, attribute)``
(``None``: the module itself); :func:`attach` returns the module-level ``__getattr__`` and
``__dir__`` that import on first access and cache the value in the package's namespace. So
``import rankwise`` and ``rankwise --help`` import neither torch nor transformers.
(scientific-python's ``lazy_loader`` does the same; twenty lines do not justify a dependency.)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def attach(package: str, table: Mapping[str, str | tuple[str, str | None]]
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names in ``table`` import on first access."""

    def __getattr__(name: str) -> Any:
        entry = table.get(name)
        if entry is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = (entry, name) if isinstance(entry, str) else entry
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__

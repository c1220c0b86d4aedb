"""Spectral inspection of a model's weight matrices: metrics, table, HTML report, comparisons.

``config`` (InspectConfig), ``loading`` (in-memory and streamed sources of matrices),
``report`` (InspectReport and its JSON), ``summary`` (model-wide figures), ``api``
(:func:`inspect`), ``table`` and ``html`` (rendering). Names are imported on first
access, so ``rankwise.inspection.config`` (the CLI's options) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "inspect": "rankwise.inspection.api",
    "InspectConfig": "rankwise.inspection.config",
    "InspectReport": "rankwise.inspection.report",
}
__all__ = ["InspectConfig", "InspectReport", "inspect"]

if TYPE_CHECKING:
    from rankwise.inspection.api import inspect
    from rankwise.inspection.config import InspectConfig
    from rankwise.inspection.report import InspectReport


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankwise.inspection' has no attribute {name!r}")

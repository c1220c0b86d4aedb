""":class:`InspectReport`, the result of ``rankwise.inspect``, and its JSON form.

``to_dict()`` is the JSON the CLI writes: ``{"model", "matrices", "summary", "settings"}``
(keys in docs/inspect.md); ``table()`` the rich table; ``write_html(path)`` the
self-contained report. Writing is atomic (temporary name, then rename).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rankwise.engine.powerlaw import PowerLawFit
from rankwise.inspection.config import InspectConfig

#: the per-matrix JSON keys always present (the issue's contract); more are added after them
MATRIX_KEYS = (
    "name",
    "shape",
    "break_even_rank",
    "energy_rank_90",
    "energy_rank_95",
    "energy_rank_99",
    "effective_rank",
    "stable_rank",
    "nuclear_norm",
    "l12_norm",
    "condition_number",
    "alpha",
    "alpha_xmin",
    "alpha_ks",
    "welore_class",
)


@dataclass
class InspectReport:
    """The result of :func:`rankwise.inspect`: one dict per matrix, a summary, and the spectra.

    ``settings``: how the report was computed (device, dtype, threads, spectrum method,
    whether the model was streamed from its safetensors).
    """

    model: str
    matrices: list[dict[str, Any]]
    summary: dict[str, Any]
    spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    fits: dict[str, PowerLawFit] = field(default_factory=dict, repr=False)
    welore_threshold: float | None = None
    config: InspectConfig | None = field(default=None, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"model", "matrices", "summary", "settings"}``, JSON-safe (NaN → null)."""
        return json_safe({"model": self.model, "matrices": self.matrices, "summary": self.summary,
                          "settings": self.settings})

    def __getitem__(self, name: str) -> dict[str, Any]:
        for row in self.matrices:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.matrices)

    def table(self, max_rows: int | None = None):
        """A rich renderable: the per-matrix table and the per-layer-type summary."""
        from rankwise.inspection.table import render

        return render(self, max_rows=max_rows)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` (atomically) or to stdout for ``"-"``."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if str(path) == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        from rankwise.io.atomic import atomic_file

        with atomic_file(path) as fh:
            fh.write(text)

    def write_html(self, path: str | os.PathLike) -> None:
        """Write the self-contained HTML report (plots inlined as PNG) to ``path`` atomically."""
        from rankwise.inspection.html import write_html

        write_html(self, path)


def json_safe(o: Any) -> Any:
    """``o`` with non-finite floats as ``None`` and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        return json_safe(o.item())
    return o

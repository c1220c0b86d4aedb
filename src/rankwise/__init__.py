"""rankwise: see, use and train the low-rank structure of neural-network weights.

The public API mirrors the command line:

* ``rankwise.inspect(model, InspectConfig(...))`` – per-matrix spectra and metrics;
* ``rankwise.compress(model, CompressConfig(...), calib=...)`` – one-shot W ≈ B A;
* ``rankwise.save(model, dir)`` / ``rankwise.load(dir)`` – factorised checkpoints;
* ``rankwise.tune.apply(model, AdapterConfig(...))`` – spectral adapters;
* ``rankwise.train.GaLoreAdamW`` and friends – low-rank training.

Heavy submodules are imported on first use, so ``import rankwise`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from rankwise.errors import RankwiseError
from rankwise.io.checkpoint import export_dense, load, save, to_dense
from rankwise.io.models import load_model, load_tokenizer, resolve_model
from rankwise.io.texts import load_text
from rankwise.surgery import LowRankLinear, find_targets

_LAZY: dict[str, tuple[str, str | None]] = {
    "inspect": ("rankwise.inspection.api", "inspect"),
    "InspectConfig": ("rankwise.inspection.api", "InspectConfig"),
    "InspectReport": ("rankwise.inspection.api", "InspectReport"),
    "compress": ("rankwise.compression.api", "compress"),
    "CompressConfig": ("rankwise.compression.api", "CompressConfig"),
    "CompressResult": ("rankwise.compression.api", "CompressResult"),
    "perplexity": ("rankwise.evaluation.perplexity", "perplexity"),
    "tune": ("rankwise.tune", None),
    "train": ("rankwise.train", None),
}

__all__ = [
    "LowRankLinear",
    "RankwiseError",
    "__version__",
    "export_dense",
    "find_targets",
    "load",
    "load_model",
    "load_text",
    "load_tokenizer",
    "resolve_model",
    "save",
    "to_dense",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")

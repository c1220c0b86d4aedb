"""rankwise: see, use and train the low-rank structure of neural-network weights.

The public API mirrors the command line:

* ``rankwise.inspect(model, InspectConfig(...))`` – per-matrix spectra and metrics;
* ``rankwise.compress(model, CompressConfig(...), calib=...)`` – one-shot W ≈ B A;
* ``rankwise.save(model, dir)`` / ``rankwise.load(dir)`` – factorised checkpoints;
* ``rankwise.tune.apply(model, AdapterConfig(...))`` – spectral adapters;
* ``rankwise.train.GaLoreAdamW`` and friends – low-rank training.

Every name except :class:`RankwiseError` and ``__version__`` is imported on first
attribute access (PEP 562), so ``import rankwise`` and ``rankwise --help`` import
neither torch nor transformers (tests/test_imports.py checks it in a subprocess).
"""

from __future__ import annotations

__version__ = "0.1.0"

from rankwise._lazy import attach
from rankwise.errors import RankwiseError
from rankwise.io.hf_integration import install as _install_transformers_integration

# quant_method "rankwise" for transformers' from_pretrained: registered now if transformers' quantizer
# registry is loaded, else by a one-shot import hook (no torch/transformers import here)
_install_transformers_integration()

#: public name → (module, attribute; None for the module itself), imported on first access
_LAZY: dict[str, tuple[str, str | None]] = {
    "save": ("rankwise.io.checkpoint", "save"),
    "load": ("rankwise.io.checkpoint", "load"),
    "export_dense": ("rankwise.io.checkpoint", "export_dense"),
    "to_dense": ("rankwise.io.checkpoint", "to_dense"),
    "load_model": ("rankwise.io.models", "load_model"),
    "load_tokenizer": ("rankwise.io.models", "load_tokenizer"),
    "resolve_model": ("rankwise.io.models", "resolve_model"),
    "load_text": ("rankwise.io.texts", "load_text"),
    "LowRankLinear": ("rankwise.surgery.lowrank", "LowRankLinear"),
    "find_targets": ("rankwise.surgery.targets", "find_targets"),
    "inspect": ("rankwise.inspection.api", "inspect"),
    "InspectConfig": ("rankwise.inspection.api", "InspectConfig"),
    "InspectReport": ("rankwise.inspection.api", "InspectReport"),
    "compress": ("rankwise.compression.api", "compress"),
    "CompressConfig": ("rankwise.compression.api", "CompressConfig"),
    "CompressResult": ("rankwise.compression.api", "CompressResult"),
    "perplexity": ("rankwise.evaluation.perplexity", "perplexity"),
    "quantize": ("rankwise.quantization.api", "quantize"),
    "QuantizeConfig": ("rankwise.quantization.api", "QuantizeConfig"),
    "tune": ("rankwise.tune", None),
    "train": ("rankwise.train", None),
}

__all__ = ["RankwiseError", "__version__", *_LAZY]

__getattr__, __dir__ = attach(__name__, _LAZY)

"""Save, load and densify quantised models (through the shared rankwise checkpoint format).

A quantised folder is a rankwise checkpoint (``docs/checkpoint.md``, written by
:func:`rankwise.save` with the layer-type registry): ``config.json`` carries
``quantization_config`` with ``quant_method: "rankwise"`` and the layer map, whose entries
have ``"type": "quant"`` (:class:`QuantLinear`) or ``"quant_lowrank"`` (:class:`QuantLowRank`);
``model.safetensors`` holds the packed tensors ``<name>.qweight`` (uint8), ``<name>.scales``
(float16), ``<name>.qzeros`` (uint8), ``<name>.bias`` and the EoRA factors ``<name>.eora_A`` /
``<name>.eora_B`` (low-rank factors under ``<name>.A.*`` / ``<name>.B.*``); ``rankwise.json``
records the quantisation settings. ``rankwise.load`` and, after ``import rankwise``,
``AutoModelForCausalLM.from_pretrained`` rebuild the layers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_FILE = "rankwise.json"

__all__ = ["export_dense", "is_quantized_folder", "load_quantized", "save_quantized", "to_dense"]


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """True for a folder whose rankwise.json lists a quantised layer."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return False
    try:
        layers = json.loads(meta.read_text()).get("layers", {})
    except (json.JSONDecodeError, AttributeError, OSError):
        return False
    return isinstance(layers, dict) and any(
        isinstance(s, dict) and str(s.get("type", "")).startswith("quant") for s in layers.values())


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False,
                   meta: dict[str, Any] | None = None) -> Path:
    """Write a quantised ``model`` to ``path`` with :func:`rankwise.save` (atomic; sha256 of every file recorded)."""
    from rankwise.io.checkpoint import save

    return save(model, path, meta=meta, tokenizer=tokenizer, overwrite=overwrite)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a quantised folder (the same as :func:`rankwise.load`; the layer types register on import)."""
    from rankwise.io.checkpoint import load

    return load(path, dtype=dtype)


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every quantised (and low-rank) layer by the dense layer it computes; a plain model results."""
    from rankwise.io.checkpoint import to_dense as checkpoint_to_dense

    return checkpoint_to_dense(model, inplace=inplace)


def export_dense(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face folder (dequantised weights) that ``from_pretrained`` loads without rankwise."""
    from rankwise.io.atomic import atomic_dir
    from rankwise.io.checkpoint import _save_tokenizer

    dense = to_dense(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        dense.save_pretrained(str(tmp))
        _save_tokenizer(model, tmp, tokenizer)
    return Path(path)

"""Save, load and densify quantised models.

A quantised folder is a rankwise checkpoint (see docs/quantize.md):

* ``model.safetensors``: every tensor; quantised layers as ``<name>.qweight`` (uint8, packed
  codes), ``<name>.scales`` (float16), ``<name>.qzeros`` (uint8, packed), ``<name>.bias`` and
  the EoRA factors ``<name>.eora_A`` / ``<name>.eora_B``; quantised low-rank factors under
  ``<name>.A.*`` and ``<name>.B.*``;
* ``config.json``: the base model's, plus ``quantization_config`` with ``quant_method: "rankwise"``
  and the layer map (so plain transformers refuses the folder instead of loading it wrong);
* ``rankwise.json``: format, version, the layer map ({module name: spec with a ``"type"`` of the
  layer-type registry}) and what the producer recorded.

Written through the checkpoint engineer's ``write_checkpoint_metadata`` when the tree has it;
until then by :func:`save_quantized` below, which follows the same documented layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.quantization.layer import QuantLinear, QuantLowRank

FORMAT = "rankwise-quant/1"
META_FILE = "rankwise.json"
LAYER_CLASSES: dict[str, type[nn.Module]] = {"quant": QuantLinear, "quant_lowrank": QuantLowRank}

__all__ = ["export_dense", "is_quantized_folder", "layer_map", "load_quantized", "save_quantized", "to_dense"]


def layer_map(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: spec} of every quantised or low-rank layer (outermost only)."""
    from rankwise.surgery.lowrank import LowRankLinear

    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in out):
            continue
        if isinstance(mod, (QuantLinear, QuantLowRank)):
            out[name] = mod.spec()
        elif isinstance(mod, LowRankLinear) and hasattr(mod, "spec"):
            out[name] = mod.spec()
    return out


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """True for a folder whose rankwise.json lists a quantised layer."""
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return False
    try:
        layers = json.loads(meta.read_text()).get("layers", {})
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(layers, dict) and any(
        isinstance(s, dict) and str(s.get("type", "")).startswith("quant") for s in layers.values())


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False,
                   meta: dict[str, Any] | None = None) -> Path:
    """Write a quantised ``model`` to ``path`` (atomically; an existing folder only with ``overwrite``)."""
    from rankwise import __version__
    from rankwise.io.atomic import atomic_dir
    from rankwise.io.checkpoint import _save_tokenizer

    layers = layer_map(model)
    meta = dict(meta or getattr(model, "rankwise_meta", {}) or {})
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        _save_tokenizer(model, tmp, tokenizer)
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["quantization_config"] = {"quant_method": "rankwise", "format": FORMAT, "layers": layers}
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        record = {
            **meta,
            "format": FORMAT,
            "rankwise_version": __version__,
            "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
            "layers": layers,
        }
        (tmp / META_FILE).write_text(json.dumps(record, indent=2))
    return Path(path)


def _build(name: str, spec: Any, dtype: torch.dtype | None) -> nn.Module:
    if not isinstance(spec, dict):
        raise RankwiseError(f"the layer map entry of {name!r} is not a mapping; the checkpoint metadata is corrupt.")
    kind = spec.get("type", "lowrank")
    if kind in LAYER_CLASSES:
        return LAYER_CLASSES[kind].from_spec(spec, dtype=dtype)
    try:
        from rankwise.surgery.layers import build_layer
    except ImportError:
        from rankwise.surgery.lowrank import LowRankLinear

        if kind != "lowrank":
            raise RankwiseError(f"unknown layer type {kind!r} for {name!r}; is this rankwise too old?") from None
        return LowRankLinear(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]),
                             bias=bool(spec.get("bias")), orig_kind=spec.get("kind", "linear"), dtype=dtype)
    return build_layer(name, spec, dtype=dtype)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder written by :func:`save_quantized`: a transformers model with its quantised layers in place."""
    import transformers

    from rankwise.io.checkpoint import _read_state_dict
    from rankwise.surgery.modules import set_module

    folder = Path(path).expanduser()
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise RankwiseError(f"{folder} has no {META_FILE}; it is not a rankwise checkpoint.")
    try:
        meta = json.loads(meta_file.read_text())
        layers = meta["layers"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise RankwiseError(f"{meta_file} is unreadable or incomplete ({exc}); write the checkpoint again.") from exc
    state = _read_state_dict(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    float_dtype = next((t.dtype for k, t in state.items() if t.is_floating_point() and t.dtype != torch.float16
                        and not k.endswith(".scales")), torch.float32)
    model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(float_dtype)
    for name, spec in layers.items():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise RankwiseError(f"{META_FILE} names module {name!r}, which this architecture lacks.") from exc
        set_module(model, name, _build(name, spec, float_dtype))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        tied = {f"{n}.weight" for n, mod in model.named_modules() if mod is head}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RankwiseError(f"checkpoint {folder} does not match its layer map (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); write it again.")
    if tied:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    model.rankwise_meta = meta
    model.config._name_or_path = str(folder)
    return model


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every quantised (and low-rank) layer by the dense layer it computes."""
    import copy

    from rankwise.surgery.lowrank import LowRankLinear
    from rankwise.surgery.modules import set_module

    if not inplace:
        model = copy.deepcopy(model)
    for name in list(layer_map(model)):
        mod = model.get_submodule(name)
        if isinstance(mod, (QuantLinear, QuantLowRank, LowRankLinear)):
            set_module(model, name, mod.to_dense())
    return model


def export_dense(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face folder (dequantised weights) that ``from_pretrained`` loads."""
    from rankwise.io.atomic import atomic_dir
    from rankwise.io.checkpoint import _save_tokenizer

    dense = to_dense(model)
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    with atomic_dir(path, overwrite=overwrite) as tmp:
        dense.save_pretrained(str(tmp))
        _save_tokenizer(model, tmp, tokenizer)
    return Path(path)

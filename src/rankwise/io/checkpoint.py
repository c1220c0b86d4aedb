"""Save and load factorised models (the ``rankwise.save`` / ``rankwise.load`` format).

A checkpoint folder holds:

* ``config.json`` and the tokenizer files: the base model's, unchanged, so
  ``AutoTokenizer.from_pretrained(folder)`` works;
* ``model.safetensors``: every tensor of the model, factorised layers stored as
  ``<module name>.A`` (k×n) and ``<module name>.B`` (m×k) plus ``.bias``;
* ``rankwise.json``: rankwise version, the rank of every factorised module,
  and whatever the producer recorded (method, allocation, ratios, calibration).

Everything is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import DAMAGED_FILE_ERRORS, RankwiseError
from rankwise.io.atomic import atomic_dir
from rankwise.surgery.layers import build_layer, layer_map
from rankwise.surgery.modules import get_module, set_module
from rankwise.surgery.modules import to_dense as to_dense
from rankwise.surgery.targets import Target, is_matrix_module

FORMAT = "rankwise-lowrank/1"
META_FILE = "rankwise.json"


def _version() -> str:
    from rankwise import __version__

    return __version__


def factorised_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: spec} for every factorised layer (LowRankLinear, ...) in ``model``."""
    return layer_map(model)


def convert_old_keys(state: dict[str, torch.Tensor], layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename round-1 keys (``name.A``, ``name.B``, ``name.bias``) of factorised layers to ``name.A.weight``,
    ``name.B.weight``, ``name.B.bias`` (the two-``nn.Linear`` layout); other keys pass through."""
    for name in layers:
        for old, new in ((".A", ".A.weight"), (".B", ".B.weight"), (".bias", ".B.bias")):
            if name + old in state and name + new not in state:
                state[name + new] = state.pop(name + old)
    return state


def _save_tokenizer(model: nn.Module, dest: Path, tokenizer=None) -> None:
    if tokenizer is None:
        src = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if src and Path(src).is_dir():
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError):  # a model folder without tokenizer files: nothing to copy
                tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))


def save(
    model: nn.Module,
    path: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its LowRankLinear layers) to ``path``; returns the folder.

    ``meta`` is merged into ``rankwise.json`` (method, allocation, ratios, ...).
    Refuses an existing folder unless ``overwrite``; never leaves a partial folder.
    """
    meta = dict(meta or getattr(model, "rankwise_meta", {}) or {})
    layers = factorised_layers(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        _save_tokenizer(model, tmp, tokenizer)
        record = {
            **meta,
            "format": FORMAT,
            "rankwise_version": _version(),
            "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
            "ranks": {k: v["rank"] for k, v in layers.items()},
            "layers": layers,
        }
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=False))
    return Path(path)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for f in files:
                out.update(load_file(str(folder / f)))
            return out
    except DAMAGED_FILE_ERRORS as exc:  # safetensors raises its own error types for bad headers
        raise RankwiseError(
            f"cannot read the weights in {folder} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "the checkpoint is corrupt, write it again with rankwise.save."
        ) from exc
    raise RankwiseError(f"{folder} has no model.safetensors; it is not a complete rankwise checkpoint.")


def _build_empty(folder: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is not None:
        return cls(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder written by :func:`save`: a transformers model with LowRankLinear layers in place."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RankwiseError(f"checkpoint folder {folder} does not exist; pass the --out folder of rankwise compress.")
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise RankwiseError(
            f"{folder} has no {META_FILE}, so it is not a rankwise checkpoint; "
            "load plain Hugging Face folders with from_pretrained or rankwise.load_model."
        )
    try:
        meta = json.loads(meta_file.read_text())
        layers = meta["layers"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise RankwiseError(f"{meta_file} is unreadable or incomplete ({exc}); write the checkpoint again.") from exc
    if not isinstance(layers, dict):
        raise RankwiseError(f"{meta_file} has a layer map of type {type(layers).__name__}; write the checkpoint again.")
    state = convert_old_keys(_read_state_dict(folder), layers)
    model = _build_empty(folder)
    for name, spec in layers.items():
        try:
            old = get_module(model, name)
        except AttributeError as exc:
            raise RankwiseError(f"{META_FILE} names module {name!r}, which this architecture lacks.") from exc
        if not is_matrix_module(old):
            raise RankwiseError(f"{META_FILE} names {name!r}, which is not a linear layer.")
        m, n = Target(name, old).shape
        a = state.get(f"{name}.A.weight")
        new = build_layer(name, spec, dtype=a.dtype if a is not None else None)
        k = new.rank
        b = state.get(f"{name}.B.weight")
        if a is None or b is None or tuple(a.shape) != (k, n) or tuple(b.shape) != (m, k):
            got = (None if a is None else tuple(a.shape), None if b is None else tuple(b.shape))
            raise RankwiseError(
                f"tensors of {name} do not match the rank map (rank {k} needs A {(k, n)} and B {(m, k)}, "
                f"found {got}); the checkpoint is inconsistent, write it again."
            )
        set_module(model, name, new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        for n_, mod in model.named_modules():
            if mod is head:
                tied.add(f"{n_}.weight")
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RankwiseError(
            f"checkpoint {folder} does not match its architecture (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); write it again with rankwise.save."
        )
    if tied:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    model.rankwise_meta = meta
    model.config._name_or_path = str(folder)
    return model


def export_dense(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a standard folder that plain ``AutoModelForCausalLM.from_pretrained`` loads."""
    dense = to_dense(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        dense.save_pretrained(str(tmp))
        _save_tokenizer(model, tmp, tokenizer)
    return Path(path)

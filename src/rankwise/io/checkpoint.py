"""Save and load factorised models: the rankwise checkpoint format (``docs/checkpoint.md``).

A checkpoint folder is a Hugging Face model folder that declares itself the way
quantised checkpoints do:

* ``config.json``: the base model's config plus ``quantization_config =
  {"quant_method": "rankwise", "format": "rankwise/2", "layers": {name: spec}}``
  (each spec has a ``"type"`` from :data:`rankwise.surgery.layers.LAYER_TYPES`,
  e.g. ``{"type": "lowrank", "rank": 24, "in_features": 576, "out_features": 576,
  "bias": false, "kind": "linear"}``) and ``transformers_weights`` set to a text that
  makes plain transformers refuse the folder with an error naming rankwise;
* ``model.safetensors`` or transformers-named shards ``model-0000k-of-0000N.safetensors``
  with ``model.safetensors.index.json``: factorised layers stored as
  ``name.A.weight`` (k×n), ``name.B.weight`` (m×k), ``name.B.bias``, plus an empty
  placeholder ``name.weight`` (so plain transformers also refuses a folder written by
  ``save_pretrained``, which drops ``transformers_weights``);
* ``rankwise.json``: rankwise version, the layer map and ranks, the sha256 of every
  tensor file (verified by :func:`load`), and what the producer recorded (method,
  allocation, ratios, calibration, threads);
* the tokenizer and ``generation_config.json``, kept from the source model.

With ``import rankwise``, ``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the
factorised layers (the ``rankwise`` quantizer, :mod:`rankwise.io.hf_quantizer`), and
:func:`load` is a thin wrapper over it that first validates the folder and checksums.
Folders of the first format (``name.A``, ``name.B``, ``name.bias``, no
``quantization_config``) are converted on load (:func:`convert_old_checkpoint`).
Everything is written to a temporary folder and renamed at the end.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.io.atomic import atomic_dir
from rankwise.io.hf_integration import register
from rankwise.io.hf_quantizer import (
    FORMAT,
    QUANT_METHOD,
    REFUSAL,
    RankwiseConfig,
    RankwiseHfQuantizer,
    check_format,
    check_layer_map,
    state_dict_with_placeholders,
)
from rankwise.io.shards import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, CheckpointReader, ShardedWriter
from rankwise.surgery.layers import build_layer, layer_map
from rankwise.surgery.modules import get_module, set_module
from rankwise.surgery.modules import to_dense as _to_dense
from rankwise.surgery.targets import Target, is_matrix_module

META_FILE = "rankwise.json"
OLD_FORMAT = "rankwise-lowrank/1"
__all__ = ["FORMAT", "META_FILE", "convert_old_checkpoint", "export_dense", "factorised_layers", "load",
           "mark_factorised", "save", "to_dense", "unmark_factorised", "write_checkpoint_metadata"]


def _version() -> str:
    from rankwise import __version__

    return __version__


def factorised_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: spec} for every factorised layer (LowRankLinear, ...) in ``model``."""
    return layer_map(model)


# -- the transformers side: a model in memory carries its quantization_config ----------------------------------------
def mark_factorised(model: nn.Module) -> nn.Module:
    """Attach ``quantization_config`` (``quant_method: "rankwise"``) and the rankwise quantizer to ``model``.

    Call after swapping factorised layers into a transformers model (``compress`` and the
    factorising training callbacks do): ``save_pretrained`` / ``Trainer.save_model`` then write a
    folder that ``from_pretrained`` rebuilds (with ``import rankwise``) and that plain transformers
    refuses. The layer map is refreshed from the model at every save. A model without factorised
    layers is unmarked. Models without a transformers ``config`` are returned unchanged.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return model
    layers = layer_map(model)
    if not layers:
        return unmark_factorised(model)
    register()
    qc = getattr(cfg, "quantization_config", None)
    if not isinstance(qc, RankwiseConfig):
        qc = RankwiseConfig(layers=layers)
    qc.layers = layers
    cfg.quantization_config = qc
    q = getattr(model, "hf_quantizer", None)
    if not isinstance(q, RankwiseHfQuantizer):
        model.hf_quantizer = RankwiseHfQuantizer(qc, pre_quantized=True)
    else:
        q.quantization_config = qc
    return model


def unmark_factorised(model: nn.Module) -> nn.Module:
    """Remove rankwise's ``quantization_config`` and quantizer (e.g. after :func:`to_dense`)."""
    cfg = getattr(model, "config", None)
    qc = getattr(cfg, "quantization_config", None) if cfg is not None else None
    if isinstance(qc, RankwiseConfig) or (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD):
        del cfg.quantization_config
    if isinstance(getattr(model, "hf_quantizer", None), RankwiseHfQuantizer):
        del model.hf_quantizer
        for attr in ("is_quantized", "quantization_method"):
            if attr in model.__dict__:
                delattr(model, attr)
    return model


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every LowRankLinear by the dense layer B A (Linear or Conv1D, as it was); a plain model results."""
    model = _to_dense(model, inplace=inplace)
    return mark_factorised(model) if layer_map(model) else unmark_factorised(model)


# -- writing ------------------------------------------------------------------------------------------------------
def _save_tokenizer(model: nn.Module, dest: Path, tokenizer=None) -> None:
    """Save ``tokenizer``, or the one of the folder the model came from (nothing if that folder has none)."""
    if tokenizer is None:
        src = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if src and Path(src).is_dir() and _has_tokenizer_files(Path(src)):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError) as exc:
                raise RankwiseError(f"cannot read the tokenizer of {src} to copy it "
                                    f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}); "
                                    "pass tokenizer=... to save.") from exc
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def write_checkpoint_metadata(
    folder: str | os.PathLike,
    hf_config,
    layers: dict[str, dict[str, Any]],
    meta: dict[str, Any] | None,
    tokenizer=None,
    generation_config=None,
    checksums: dict[str, str] | None = None,
) -> None:
    """Write everything but the tensors: ``config.json``, ``rankwise.json``, tokenizer, generation config.

    ``config.json`` is ``hf_config`` with ``quantization_config`` (``quant_method: "rankwise"``,
    the format version and ``layers``) and the ``transformers_weights`` refusal marker, so plain
    transformers refuses the folder with an error naming rankwise while ``import rankwise`` makes
    ``from_pretrained`` rebuild the layers. ``checksums`` ({file: sha256}, from
    :meth:`ShardedWriter.close`) are recorded in ``rankwise.json`` and verified by :func:`load`.
    A folder without factorised layers (``layers`` empty) gets a plain config.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_layer_map(layers, "layers")
    cfg = copy.deepcopy(hf_config)
    for attr in ("quantization_config", "transformers_weights"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    if layers:
        cfg.quantization_config = {"quant_method": QUANT_METHOD, "format": FORMAT, "layers": layers}
    cfg_dict = json.loads(cfg.to_json_string(use_diff=True))
    if layers:
        cfg_dict["transformers_weights"] = REFUSAL
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    record = {
        **(meta or {}),
        "format": FORMAT,
        "rankwise_version": _version(),
        "architecture": (getattr(hf_config, "architectures", None) or [None])[0],
        "torch_threads": torch.get_num_threads(),
        "ranks": {k: v["rank"] for k, v in layers.items() if "rank" in v},
        "layers": layers,
        "checksums": dict(checksums or {}),
    }
    (folder / META_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _tensors_to_write(model: nn.Module, layers: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict with placeholders, tied duplicates (same storage) written once, like save_pretrained."""
    state = state_dict_with_placeholders(model, layers)
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if v.is_meta:
            raise RankwiseError(f"tensor {k} is on the meta device (an offloaded or never loaded model); load the "
                                "model fully before saving it.")
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue  # a tied weight (lm_head = embed_tokens): transformers ties it again on load
        if key is not None:
            seen.add(key)
        out[k] = v
    return out


def save(
    model: nn.Module,
    path: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write ``model`` (with its factorised layers) to ``path`` in the rankwise format; returns the folder.

    Tensors go through :class:`~rankwise.io.shards.ShardedWriter` (one ``model.safetensors``, or
    transformers-named shards of at most ``max_shard_size`` with an index); the sha256 of every file
    is recorded. ``meta`` is merged into ``rankwise.json``. The tokenizer (``tokenizer``, or the
    source folder's) and the generation config are kept. Refuses an existing folder unless
    ``overwrite``; never leaves a partial folder.
    """
    from rankwise.io.shards import parse_size

    parse_size(max_shard_size)  # a bad size is an error before any work
    if not hasattr(model, "config") or not hasattr(model.config, "to_json_string"):
        raise RankwiseError(f"rankwise.save needs a transformers model (with a config), got {type(model).__name__}.")
    meta = dict(meta if meta is not None else getattr(model, "rankwise_meta", {}) or {})
    meta.pop("checksums", None)
    layers = layer_map(model)
    gen = getattr(model, "generation_config", None) if getattr(model, "can_generate", lambda: False)() else None
    with atomic_dir(path, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size=max_shard_size)
        dtypes = set()
        for k, v in _tensors_to_write(model, layers).items():
            writer.add(k, v)
            if v.is_floating_point() and v.numel():
                dtypes.add(v.dtype)
        sums = writer.close()
        cfg = copy.deepcopy(model.config)
        if len(dtypes) == 1:
            cfg.dtype = str(next(iter(dtypes))).removeprefix("torch.")
        cfg.architectures = [type(model).__name__]
        _save_tokenizer(model, tmp, tokenizer)
        write_checkpoint_metadata(tmp, cfg, layers, meta, generation_config=gen, checksums=sums)
    return Path(path)


# -- reading ------------------------------------------------------------------------------------------------------
def _read_meta(folder: Path) -> dict[str, Any]:
    meta_file = folder / META_FILE
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RankwiseError(f"{meta_file} is unreadable ({str(exc).splitlines()[0][:100]}); "
                            "write the checkpoint again.") from exc
    if not isinstance(meta, dict) or "layers" not in meta:
        raise RankwiseError(f"{meta_file} has no layer map; it is incomplete, write the checkpoint again.")
    return meta


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder (validated by :class:`CheckpointReader` first)."""
    reader = CheckpointReader(folder)
    return {k: reader.get(k) for k in reader.keys()}


def model_class_for(config, task: str | None = None):
    """The transformers class for ``config``, chosen through the Auto classes' mappings only.

    ``config.architectures[0]`` is matched against the classes the Auto mappings give for this
    config type (never looked up as an attribute of ``transformers``); without a match, the
    causal-LM class (or the base model) is used.
    """
    import transformers

    autos = [transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification,
             transformers.AutoModelForMaskedLM, transformers.AutoModelForSeq2SeqLM,
             transformers.AutoModelForTokenClassification, transformers.AutoModelForQuestionAnswering,
             transformers.AutoModel]
    candidates = []
    for auto in autos:
        try:
            cls = auto._model_mapping[type(config)]
        except (KeyError, ValueError):
            continue
        for c in cls if isinstance(cls, (list, tuple)) else (cls,):
            candidates.append(c)
    if not candidates:
        raise RankwiseError(f"transformers has no model class for model_type {config.model_type!r}; "
                            "this checkpoint needs a newer transformers.")
    arch = (getattr(config, "architectures", None) or [None])[0]
    for c in candidates:
        if c.__name__ == arch:
            return c
    return candidates[0]


def convert_old_checkpoint(src: str | os.PathLike, dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rewrite a first-format folder (``name.A``/``name.B``/``name.bias``, no ``quantization_config``) in the
    current format at ``dest`` (tensors renamed to ``name.A.weight``/``name.B.weight``/``name.B.bias``)."""
    src = Path(src).expanduser()
    meta = _read_meta(src)
    layers = check_layer_map(meta["layers"], f"{src / META_FILE}")
    reader = CheckpointReader(src)
    cfg = reader.config
    skeleton = _skeleton(cfg)
    specs: dict[str, dict[str, Any]] = {}
    for name, spec in layers.items():
        old = _linear_for(skeleton, name)
        m, n = Target(name, old).shape
        layer = build_layer(name, {"in_features": n, "out_features": m, "type": "lowrank", **spec}, device="meta")
        specs[name] = layer.spec()
    renames = {}
    for name in layers:
        for old, new in ((".A", ".A.weight"), (".B", ".B.weight"), (".bias", ".B.bias")):
            if name + old in reader:
                renames[name + old] = name + new
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp)
        for k in reader.keys():
            writer.add(renames.get(k, k), reader.get(k))
        for name in layers:
            a = reader.get(name + ".A") if name + ".A" in reader else reader.get(name + ".A.weight")
            writer.add(f"{name}.weight", torch.empty(0, dtype=a.dtype))
        sums = writer.close()
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src)) if _has_tokenizer_files(src) else None
        except (OSError, ValueError):
            tok = None
        gen = None
        if (src / "generation_config.json").is_file():
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(str(src))
        keep = {k: v for k, v in meta.items() if k not in ("format", "layers", "ranks", "checksums")}
        write_checkpoint_metadata(tmp, cfg, specs, {**keep, "converted_from": OLD_FORMAT}, tokenizer=tok,
                                  generation_config=gen, checksums=sums)
    return Path(dest)


def _skeleton(cfg):
    from accelerate import init_empty_weights

    cls = model_class_for(cfg)
    with init_empty_weights():
        return cls(cfg)


def _linear_for(model: nn.Module, name: str) -> nn.Module:
    try:
        mod = get_module(model, name)
    except AttributeError:
        raise RankwiseError(f"{META_FILE} names module {name!r}, which this architecture lacks.") from None
    if not is_matrix_module(mod):
        raise RankwiseError(f"{META_FILE} names {name!r}, which is not a linear layer.")
    return mod


def is_old_format(folder: Path) -> bool:
    """True for a first-format rankwise folder (no rankwise ``quantization_config`` in config.json)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return not (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD)


def _as_dtype(dtype: Any):
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    from rankwise.engine.device import resolve_dtype

    return resolve_dtype(str(dtype), None)


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    verify: bool = True,
) -> nn.Module:
    """Load a rankwise checkpoint folder: a transformers model with its factorised layers in place.

    A thin wrapper over ``from_pretrained`` (through the ``rankwise`` quantizer): the folder is
    validated first (index, shards, headers, sizes against config.json; the sha256 recorded for
    every tensor file when ``verify``), then the model class is chosen through the Auto mappings and
    built on the meta device; no randomly initialised full model is ever built. ``dtype``: None
    keeps the checkpoint's. ``device_map`` (``"auto"``, ...) uses accelerate's big-model loading,
    offloading to CPU and to ``offload_folder`` (a temporary folder by default). First-format
    folders are converted on the fly (:func:`convert_old_checkpoint`).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RankwiseError(f"checkpoint folder {folder} does not exist; pass the --out folder of rankwise compress.")
    if not (folder / META_FILE).is_file():
        raise RankwiseError(
            f"{folder} has no {META_FILE}, so it is not a rankwise checkpoint; "
            "load plain Hugging Face folders with from_pretrained or rankwise.load_model."
        )
    meta = _read_meta(folder)
    if is_old_format(folder):
        with tempfile.TemporaryDirectory(prefix="rankwise-convert-") as tmp:
            new = convert_old_checkpoint(folder, Path(tmp) / "converted")
            model = load(new, dtype=dtype, device_map=device_map, offload_folder=offload_folder, verify=False)
            # the converted files are deleted; every tensor must own its memory
            for p in list(model.parameters()) + list(model.buffers()):
                if not p.is_meta:
                    p.data = p.data.clone()
        model.rankwise_meta = meta
        model.config._name_or_path = str(folder.resolve())  # absolute: adapters name their base
        return model
    check_format(meta.get("format"), str(folder / META_FILE))
    reader = CheckpointReader(folder)
    if verify:
        if "checksums" not in meta:
            raise RankwiseError(f"{folder / META_FILE} records no checksums; write the checkpoint again "
                                "(or load with verify=False).")
        reader.verify(meta["checksums"])
    config = reader.config
    qc = getattr(config, "quantization_config", None)
    layers = qc.get("layers") if isinstance(qc, dict) else getattr(qc, "layers", None)
    check_layer_map(layers, f"{folder / 'config.json'} quantization_config")
    if meta.get("layers") != layers:
        raise RankwiseError(f"the layer maps of {META_FILE} and config.json in {folder} differ; the checkpoint was "
                            "edited or mixed from two runs, write it again.")
    for name, spec in layers.items():  # rank-map errors (null, non-integer ranks, shapes) as one line, before building
        layer = build_layer(name, spec, device="meta")
        for key, t in layer.state_dict().items():
            full = f"{name}.{key}"
            if full not in reader:
                raise RankwiseError(f"{folder} has no tensor {full}, which the layer map requires; the checkpoint "
                                    "is incomplete, write it again.")
            if tuple(reader.shape(full)) != tuple(t.shape):
                raise RankwiseError(
                    f"tensor {full} has shape {list(reader.shape(full))}, but the rank map (rank "
                    f"{spec.get('rank')}) needs {list(t.shape)}: the tensors do not match the rank map; "
                    "write the checkpoint again."
                )
    register()
    cls = model_class_for(config)
    kwargs: dict[str, Any] = {"dtype": _as_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
        kwargs["offload_folder"] = str(offload_folder or tempfile.mkdtemp(prefix="rankwise-offload-"))
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    except RankwiseError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RankwiseError(f"cannot load the rankwise checkpoint {folder}: {msg}") from exc
    model.eval()
    model.rankwise_meta = meta
    model.config._name_or_path = str(folder.resolve())  # absolute: adapters name their base
    return model


def export_dense(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a standard folder that plain ``AutoModelForCausalLM.from_pretrained`` loads."""
    dense = to_dense(model)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        dense.save_pretrained(str(tmp))
        _save_tokenizer(model, tmp, tokenizer)
    return Path(path)


# kept for callers of the first version
_ = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, set_module)

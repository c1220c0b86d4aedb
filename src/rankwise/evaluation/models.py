"""Loading the models an eval measures: on a device, in a dtype, or placed by accelerate (``device_map``).

Every loaded model is checked for NaN/Inf weights (``rankwise.io.models.check_finite``: one line
naming the tensor) before it is measured: a broken checkpoint must not come out as
"perplexity nan" with exit status 0. Offloaded (meta) parameters are not checked.
"""

from __future__ import annotations

import inspect as pyinspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError


@dataclass
class LoadedModel:
    """A model ready to measure, with its tokenizer, folder, kind (``dense``/``rankwise``) and placement."""

    name: str
    model: nn.Module
    tokenizer: Any
    path: Path
    kind: str
    dtype: torch.dtype
    placement: dict[str, int] | str
    offload_dir: Any = None  # a TemporaryDirectory holding disk-offloaded weights, alive as long as the model


def checkpoint_dtype(folder: Path) -> torch.dtype | None:
    """The dtype a folder's config.json declares, if any."""
    import json

    from rankwise.engine.device import DTYPES

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):  # a broken config.json: the loader reports it
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return DTYPES.get(str(value).removeprefix("torch.")) if isinstance(value, str) else None


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embedding's device (placed models), else its first parameter's."""
    if getattr(model, "hf_device_map", None):
        try:
            dev = model.get_input_embeddings().weight.device
        except (AttributeError, NotImplementedError):
            dev = torch.device("cpu")
        return torch.device("cpu") if dev.type == "meta" else dev
    return next(model.parameters()).device


def _placement(model: nn.Module) -> dict[str, int] | str:
    dm = getattr(model, "hf_device_map", None)
    if not dm:
        return str(next(model.parameters()).device)
    counts: dict[str, int] = {}
    for where in dm.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def load_for_eval(name: str, device: torch.device, dtype: str | torch.dtype = "auto",
                  device_map: str | None = None, max_memory: dict | None = None) -> LoadedModel:
    """Load ``name`` (built-in, folder, rankwise checkpoint) with its tokenizer, checked finite.

    ``dtype`` ``auto`` keeps the checkpoint's own dtype (float32 when it declares none).
    ``device_map`` (``auto`` …) loads through accelerate's big-model placement (plain folders via
    ``from_pretrained(device_map=...)``, rankwise checkpoints via ``rankwise.load(device_map=...)``).
    """
    from rankwise.engine.device import resolve_dtype
    from rankwise.io.models import check_finite, is_rankwise_checkpoint, load_model, load_tokenizer, resolve_model

    path = resolve_model(name)
    rankwise_ckpt = is_rankwise_checkpoint(path)
    kind = "rankwise" if rankwise_ckpt else "dense"
    dt = resolve_dtype(dtype, checkpoint_dtype(path))
    placed: dict[str, Any] = {}
    offload = None
    if device_map is not None:
        import tempfile

        offload = tempfile.TemporaryDirectory(prefix="rankwise-offload-")
        placed = {"device_map": device_map, "offload_folder": offload.name}
        if max_memory:
            placed["max_memory"] = dict(max_memory)  # transformers rewrites it in place
    if rankwise_ckpt:
        from rankwise.io.checkpoint import load

        if device_map is not None:
            if "device_map" not in pyinspect.signature(load).parameters:
                raise RankwiseError("this rankwise version cannot place a compressed checkpoint with --device-map; "
                                    "use --device instead.")
            model = load(path, dtype=dt, **placed)
        else:
            model = load(path, dtype=dt).to(device)
    elif device_map is not None:
        model = load_model(path, dtype=dt, **placed)
    else:
        model = load_model(path, dtype=dt).to(device)
    model.eval()
    check_finite(model, path)  # (load_model checks plain folders itself; rankwise.load's result is checked here)
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise RankwiseError(f"{path} has no usable tokenizer files ({str(exc).splitlines()[0][:100]}); "
                            "save the tokenizer with the model.") from exc
    return LoadedModel(name=name, model=model, tokenizer=tok, path=path, kind=kind, dtype=dt,
                       placement=_placement(model), offload_dir=offload)

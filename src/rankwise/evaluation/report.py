"""Size of a model: parameter counts (dense and factorised) and bytes on disk."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.targets import find_targets

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class SizeReport:
    """How big a model is in memory and on disk.

    ``params``: unique parameters (tied weights counted once). ``factorised_layers``
    / ``factorised_params``: the LowRankLinear layers and their A, B numbers.
    ``dense_matrix_params``: numbers in the remaining dense target matrices. ``select_layers``: MoDeGPT's
    row/column-selection layers (``SelectLinear``; quantised ones included).
    ``param_bytes``: bytes the parameters take in memory. ``disk_bytes``: all
    files of the model folder; ``weights_bytes``: its weight files only
    (None for both when the model has no folder).
    """

    params: int
    param_bytes: int
    factorised_layers: int
    factorised_params: int
    dense_matrix_params: int
    disk_bytes: int | None
    weights_bytes: int | None
    select_layers: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(number of unique parameters, their bytes); tied parameters count once."""
    seen: set[int] = set()
    n = b = 0
    for p in model.parameters():
        key = p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        n += p.numel()
        b += p.numel() * p.element_size()
    return n, b


def folder_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes of every file under ``path``, bytes of its weight files)."""
    total = weights = 0
    for root, _, files in os.walk(path):
        for f in files:
            size = (Path(root) / f).stat().st_size
            total += size
            if f.endswith(WEIGHT_SUFFIXES):
                weights += size
    return total, weights


def size_report(model: nn.Module, path: str | os.PathLike | None = None) -> SizeReport:
    """Parameter counts of ``model`` and, when ``path`` (its folder) is given, its bytes on disk."""
    params, pbytes = count_params(model)
    fact = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    try:
        dense = sum(t.num_params for t in find_targets(model))
    except RankwiseError:  # every matrix layer is factorised: no dense targets left
        dense = 0
    disk = weights = None
    if path is not None and Path(path).is_dir():
        disk, weights = folder_bytes(path)
    return SizeReport(
        params=params,
        param_bytes=pbytes,
        factorised_layers=len(fact),
        factorised_params=sum(m.num_params for m in fact),
        dense_matrix_params=dense,
        disk_bytes=disk,
        weights_bytes=weights,
        select_layers=sum(1 for m in model.modules() if getattr(m, "layer_type", None) in ("select", "quant_select")),
    )

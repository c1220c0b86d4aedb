"""``modegpt``: MoDeGPT's structured modular decomposition (the algorithm: :mod:`rankwise.compression.modegpt`).

It is not a per-matrix factorisation: the entry carries ``run_pipeline``, which
:func:`rankwise.compression.api.run_pipeline` calls instead of the per-matrix stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.methods.base import Method, MethodOptions, Transformed
from rankwise.compression.methods.registry import register
from rankwise.errors import RankwiseError


@dataclass
class StructuredMethod(Method):
    """A method that rewrites whole blocks; ``run_pipeline`` replaces the per-matrix pipeline."""

    run_pipeline: Callable[..., Any] | None = None


def _no_matrix(W: torch.Tensor, stats: LayerStats | None, options: MethodOptions, name: str) -> Transformed:
    raise RankwiseError(f"modegpt decomposes whole blocks, not the single matrix {name}; run it through "
                        "rankwise.compress / rankwise compress --method modegpt.")


def _run(*args: Any, **kwargs: Any) -> Any:
    from rankwise.compression.modegpt import run_modegpt

    return run_modegpt(*args, **kwargs)


register(StructuredMethod(
    name="modegpt", transform=_no_matrix, needs_xtx=True, run_pipeline=_run,
    doc="MoDeGPT: Nyström MLP, CR query-key, SVD value-output per block, global sparsity by block influence",
))

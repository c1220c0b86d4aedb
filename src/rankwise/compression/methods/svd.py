"""svd (LoRD): truncate the plain SVD of W. Data-free; the loss of a direction is σᵢ²."""

from __future__ import annotations

import torch

from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.methods.base import Method, MethodOptions, Transformed
from rankwise.compression.methods.registry import register


def _transform(W: torch.Tensor, stats: LayerStats | None, opts: MethodOptions, name: str) -> Transformed:
    return Transformed(M=W)


METHOD = register(Method("svd", _transform, doc="plain truncated SVD (LoRD), data-free"))

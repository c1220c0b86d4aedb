"""asvd (activation-aware SVD): scale input columns by s_j = (mean |X_j|)^α before the SVD.

SVD of W·diag(s), truncate, fold diag(s)⁻¹ into A. Channels with large
activations (outliers) are kept more faithfully. α = 0.5 by default.
"""

from __future__ import annotations

import torch

from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.methods.base import Method, MethodOptions, Transformed
from rankwise.compression.methods.registry import register


def _transform(W: torch.Tensor, stats: LayerStats | None, opts: MethodOptions, name: str) -> Transformed:
    if stats is None or stats.abs_sum is None or stats.rows == 0:
        raise ValueError(f"asvd needs activation statistics for {name}")
    s = stats.mean_abs.to(torch.float64) ** opts.asvd_alpha
    floor = float(s[s > 0].min()) if bool((s > 0).any()) else 1.0
    s = s.clamp_min(floor * 1e-3 if floor > 0 else 1e-12)  # dead channels: keep the fold-back finite
    return Transformed(M=W * s[None, :], in_inv=1.0 / s)


METHOD = register(Method("asvd", _transform, needs_abs=True, doc="activation-aware SVD, s_j = mean|X_j|^α"))

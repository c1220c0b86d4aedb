"""fwsvd (Fisher-weighted SVD): weight output rows by d_i = sqrt(Σ_j F_ij).

F = Σ over calibration batches of the squared weight gradients (an empirical
Fisher diagonal). Summing F over a row gives the importance of output i; the
row-weighted error ‖diag(d)(W − BA)‖_F² = Σ_i (Σ_j F_ij)‖ΔW_i‖² is the FWSVD
approximation of the Fisher-weighted loss, hence the square root. SVD of
diag(d)·W, truncate, fold diag(d)⁻¹ into B (the output side).
"""

from __future__ import annotations

import torch

from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.methods.base import Method, MethodOptions, Transformed
from rankwise.compression.methods.registry import register


def _transform(W: torch.Tensor, stats: LayerStats | None, opts: MethodOptions, name: str) -> Transformed:
    if stats is None or stats.grad_sq is None:
        raise ValueError(
            f"fwsvd needs squared gradients for {name}; the forward loop must compute a loss and call backward()"
        )
    d = stats.grad_sq.to(torch.float64).sqrt()  # grad_sq holds the row sums Σ_j F_ij
    pos = d[d > 0]
    floor = float(pos.min()) * 1e-3 if len(pos) else 1.0
    d = d.clamp_min(floor)  # rows that never received gradient: keep the fold-back finite
    return Transformed(M=d[:, None] * W, out_inv=1.0 / d)


METHOD = register(Method("fwsvd", _transform, needs_grad=True, doc="Fisher-weighted SVD, row weights √ΣF"))

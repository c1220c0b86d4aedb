"""LOST (Li et al. 2025, "Low-rank and Sparse Pre-training"): an SVD-split low-rank part plus a channel-wise sparse
part built from the rest of the spectrum.

For each target W = U Σ Vᵀ (m×n, the model's current weights: its random init when pre-training):

* low-rank part: B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ (the top ``rank`` singular directions, split evenly);
* sparse part: the residual R = W − U_r Σ_r V_rᵀ (= the remaining singular directions) kept on the
  k = max(1, round(δ·n)) input channels (columns) where ‖R[:, j]‖ is largest; S = R[:, cols].

Both parts train. A layer holds r(m+n) + m·k (+ m for a bias) numbers. Our reading of the paper's
"channel-wise sparse components from the remaining singular values": the column choice by residual
norm is ours (the paper's code was not reachable from here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.engine.svd import thin_svd
from rankwise.surgery.targets import Target
from rankwise.train.regimes import REGIMES
from rankwise.train.regimes.base import Regime
from rankwise.train.regimes.layers import SparseLowRankLinear


def lost_channels(n: int, density: float) -> int:
    """Input channels kept in the sparse part of an m×n matrix at density δ: round(δ·n), at least 1."""
    return max(1, min(n, round(density * n)))


def lost_split(w: torch.Tensor, rank: int, channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """(B, A, cols, S) of the LOST init of ``w`` (float32 m×n): B A the rank-r SVD part, S = residual[:, cols]."""
    u, s, vh = thin_svd(w.float())
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    resid = (u[:, rank:] * s[rank:]) @ vh[rank:]
    cols = resid.norm(dim=0).topk(channels).indices.sort().values
    return b, a, cols, resid[:, cols]


@REGIMES.register("lost")
class LOST(Regime):
    """Low-rank (top singular directions) plus channel-wise sparse (rest of the spectrum) weights."""

    name = "lost"

    def __init__(self, rank: int = 128, targets: str | None = None, seed: int = 0, sparse_density: float = 0.03,
                 **_: Any) -> None:
        super().__init__(rank, targets, seed, sparse_density=float(sparse_density))
        self.density = float(sparse_density)

    def prepare(self, model: nn.Module) -> nn.Module:
        def make(t: Target, w: torch.Tensor) -> nn.Module:
            m, n = w.shape
            k = lost_channels(n, self.density)
            b, a, cols, s = lost_split(w, self.rank, k)
            layer = SparseLowRankLinear(n, m, self.rank, k, pattern="channel", scale=1.0, bias=t.bias is not None,
                                        orig_kind="conv1d" if t.transposed else "linear", dtype=t.module.weight.dtype)
            with torch.no_grad():
                layer.A.weight.copy_(a)
                layer.B.weight.copy_(b)
                if t.bias is not None:
                    layer.B.bias.copy_(t.bias.detach())
                layer.sparse_index.copy_(cols)
                layer.sparse_value.copy_(s)
            return layer

        return self._swap(model, make)

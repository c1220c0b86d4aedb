"""SLTrain (Han et al. 2024): W = s·B A + S with S on a fixed random support, trained from a random init.

Each target m×n matrix becomes a :class:`~rankwise.train.regimes.layers.SparseLowRankLinear` with

* ``A`` (r×n) Kaiming-uniform and ``B`` (m×r) zero, scaled by s = α/r (``lora_alpha``, default 16 as the
  paper's scripts), so the low-rank part starts at zero;
* ``nnz = ⌊δ·m·n⌋`` positions of S drawn uniformly without replacement (seeded, sorted, never changed)
  and their values U(±1/√n), the scale of ``nn.Linear``'s init;

so a layer holds r(m+n) + ⌊δ m n⌋ (+ m for a bias) trainable numbers from the first step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.surgery.targets import Target
from rankwise.train.regimes import REGIMES
from rankwise.train.regimes.base import Regime, kaiming_uniform
from rankwise.train.regimes.layers import SparseLowRankLinear, index_dtype


def sltrain_nnz(m: int, n: int, density: float) -> int:
    """Entries of the random support of an m×n matrix at density δ: ⌊δ·m·n⌋, at least 1."""
    return max(1, int(density * m * n))


@REGIMES.register("sltrain")
class SLTrain(Regime):
    """Sparse plus low-rank weights with a fixed random support (see the module doc)."""

    name = "sltrain"

    def __init__(self, rank: int = 128, targets: str | None = None, seed: int = 0, sparse_density: float = 0.03,
                 lora_alpha: float | None = None, **_: Any) -> None:
        alpha = 16.0 if lora_alpha is None else float(lora_alpha)
        super().__init__(rank, targets, seed, sparse_density=float(sparse_density), lora_alpha=alpha)
        self.density, self.scale = float(sparse_density), alpha / self.rank

    def prepare(self, model: nn.Module) -> nn.Module:
        gen = self._generator()

        def make(t: Target, w: torch.Tensor) -> nn.Module:
            m, n = w.shape
            nnz = sltrain_nnz(m, n, self.density)
            layer = SparseLowRankLinear(n, m, self.rank, nnz, pattern="random", scale=self.scale,
                                        bias=t.bias is not None, orig_kind="conv1d" if t.transposed else "linear",
                                        dtype=t.module.weight.dtype)
            with torch.no_grad():
                layer.A.weight.copy_(kaiming_uniform((self.rank, n), n, gen))
                layer.B.weight.zero_()
                if t.bias is not None:
                    layer.B.bias.copy_(t.bias.detach())
                idx = torch.randperm(m * n, generator=gen)[:nnz].sort().values
                layer.sparse_index.copy_(idx.to(index_dtype(m * n)))
                bound = 1.0 / n**0.5
                layer.sparse_value.copy_(torch.rand(nnz, generator=gen).mul_(2 * bound).sub_(bound))
            return layer

        return self._swap(model, make)

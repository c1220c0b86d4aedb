"""WeLore-LRC fine-tuning: on a WeLore-compressed model, train the factors of the low-rank components.

The low-rank components (LRCs) are the :class:`LowRankLinear` layers of a
compressed model; the non-low-rank components (N-LRCs) stayed dense and are
left frozen (WeLore, Jaiswal et al. 2024). Each LRC gets trainable copies of
its factors A (k×n) and B (m×k): k(m+n) parameters; the base layer keeps the
compressed factors until :meth:`merge` writes the trained ones into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.tune.base import AdapterLayer
from rankwise.tune.config import AdapterConfig


class FactorLayer(AdapterLayer):
    """y = B(Ax) + bias with trainable copies of a LowRankLinear's factors."""

    method = "welore-lrc"
    wraps_lowrank = True

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name)
        a = base.A.weight if state is None else self.from_state(state, "A")
        b = base.B.weight if state is None else self.from_state(state, "B")
        if tuple(a.shape) != tuple(base.A.weight.shape) or tuple(b.shape) != tuple(base.B.weight.shape):
            raise RankwiseError(f"factor shapes of {name} do not match the model; the adapter is for another model.")
        self.A = self._param(a)
        self.B = self._param(b)
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return int(self.base.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return F.linear(F.linear(x, self.A), self.B, self.base.bias)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.B.float() @ self.A.float() - self.base.B.weight.float() @ self.base.A.weight.float()

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained factors into the base LowRankLinear (the old ones are kept for unmerge)."""
        if self.merged:
            raise RankwiseError(f"{self.layer_name} is already merged; call unmerge first (merge twice is an error).")
        self._stash = (self.base.A.weight.detach().clone(), self.base.B.weight.detach().clone())
        self.base.A.weight.copy_(self.A)
        self.base.B.weight.copy_(self.B)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the compressed model's own factors back (bit-for-bit)."""
        if not self.merged or self._stash is None:
            raise RankwiseError(f"{self.layer_name} is not merged; nothing to unmerge.")
        self.base.A.weight.copy_(self._stash[0])
        self.base.B.weight.copy_(self._stash[1])
        self._stash = None
        self.merged = False

    def closed_form_params(self) -> int:
        return self.rank * (self.m + self.n)

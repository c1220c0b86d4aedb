"""Healing a compressed model (docs/methods.md §3 "healing"): train its factors, or a small LoRA beside them.

``heal_mode="factors"`` (default) trains the A/B factors of every
:class:`LowRankLinear` of a ``rankwise.load``-ed model (the SVD-LLM recipe);
``heal_mode="lora"`` keeps them frozen and adds a LoRA of rank ``lora_rank``
(default ``rank``) to each. Merging the LoRA appends its factors to the
layer's (rank k + r_l, exact), so the model stays factorised.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.tune.config import AdapterConfig
from rankwise.tune.lora import LoRALayer
from rankwise.tune.welore_lrc import FactorLayer


class HealFactorLayer(FactorLayer):
    """Trainable copies of a compressed layer's factors: k(m+n) parameters."""

    method = "heal"


class HealLoRALayer(LoRALayer):
    """A LoRA beside a frozen LowRankLinear: y = B(Ax) + b + (α/r)·B_l A_l x."""

    method = "heal"
    wraps_lowrank = True

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        rl = config.lora_rank or config.r
        cfg = AdapterConfig(**{**config.to_dict(), "rank": rl, "alpha": config.alpha})
        super().__init__(base, cfg, name, state=state)
        self._stash: LowRankLinear | None = None

    @torch.no_grad()
    def merge(self) -> None:
        """Replace the base by a LowRankLinear of rank k + r_l holding [B, sB_l][A; A_l] (exact)."""
        if self.merged:
            raise RankwiseError(f"{self.layer_name} is already merged; call unmerge first (merge twice is an error).")
        old = self.base
        b = torch.cat([old.B.weight, self.lora_B * self.scaling], dim=1)
        a = torch.cat([old.A.weight, self.lora_A], dim=0)
        self._stash = old
        self.base = LowRankLinear.from_factors(b, a, old.bias, orig_kind=old.orig_kind, dtype=old.A.weight.dtype)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or self._stash is None:
            raise RankwiseError(f"{self.layer_name} is not merged; nothing to unmerge.")
        self.base = self._stash
        self._stash = None
        self.merged = False


def heal_layer(base: nn.Module, config: AdapterConfig, name: str, state=None) -> nn.Module:
    """The heal layer for ``config.heal_mode``."""
    cls = HealLoRALayer if config.heal_mode == "lora" else HealFactorLayer
    return cls(base, config, name, state=state)

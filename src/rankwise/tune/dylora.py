"""DyLoRA (Valipour et al. 2023): nested ranks, so one training run serves every rank b ≤ r.

Each training forward draws b uniformly from {1, …, r} and uses only the first
b rows of A and columns of B, scaled by α/b (the paper's truncated forward). The
draw comes from a generator seeded identically in every layer, so all layers
use the same b in one step, as in the paper, without a model-wide hook. At
inference ``eval_rank`` (``--eval-rank``, default r) picks the truncation; merge
folds ΔW = (α/b)·B[:, :b] A[:b] for that b. Parameters: r(m+n), like a LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.tune.config import AdapterConfig
from rankwise.tune.lora import LoRALayer


class DyLoRALayer(LoRALayer):
    """LoRA whose forward is truncated to a random rank b while training, to ``eval_rank`` at inference."""

    method = "dylora"

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name, state=state)
        self.eval_rank = self.rank if config.eval_rank is None else int(config.eval_rank)
        self.set_eval_rank(self.eval_rank)
        self._gen = torch.Generator().manual_seed(int(config.seed) * 7919 + 17)  # same stream in every layer

    def set_eval_rank(self, k: int) -> None:
        """Use the first ``k`` components at inference (1 ≤ k ≤ trained rank)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.rank:
            raise RankwiseError(f"--eval-rank {k} is outside 1..{self.rank}: DyLoRA serves every rank up to the "
                                f"trained rank {self.rank}.")
        if self.merged:
            raise RankwiseError(f"{self.layer_name} is merged at rank {self.eval_rank}; unmerge before changing it.")
        self.eval_rank = k

    def _rank_now(self) -> int:
        if self.training:
            return int(torch.randint(1, self.rank + 1, (1,), generator=self._gen))
        return self.eval_rank

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._rank_now()
        return F.linear(F.linear(self._drop(x), self.lora_A[:b]), self.lora_B[:, :b]) * (self.lora_alpha / b)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        b = self.eval_rank
        return (self.lora_B[:, :b].float() @ self.lora_A[:b].float()) * (self.lora_alpha / b)

"""LoRA (Hu et al. 2021): ΔW = (α/r)·B A with A Kaiming-uniform, B = 0, so the output at init is the base's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.tune.base import AdapterLayer, kaiming_a, layer_generator
from rankwise.tune.config import AdapterConfig


class LoRALayer(AdapterLayer):
    """y = base(x) + (α/r)·B(A·dropout(x)); trainable A (r×n) and B (m×r): r(m+n) parameters."""

    method = "lora"

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name)
        r = self.check_rank(config.r)
        self._rank = r
        self.scaling = config.scaling
        self.lora_alpha = config.lora_alpha
        if state is None:
            a = kaiming_a(r, self.n, layer_generator(config, name))
            b = torch.zeros(self.m, r)
        else:
            a, b = self.from_state(state, "lora_A"), self.from_state(state, "lora_B")
        self.lora_A = self._param(a)
        self.lora_B = self._param(b)

    @property
    def rank(self) -> int:
        return self._rank

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self._drop(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def closed_form_params(self) -> int:
        return self._rank * (self.m + self.n)

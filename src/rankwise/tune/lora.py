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


class FactorInitLoRALayer(LoRALayer):
    """LoRA whose factors start at (A₀, B₀) with B₀A₀ ≠ 0 (PiSSA, LoRA-GA).

    The base keeps W − s·B₀A₀ so the output at init is the base's; A₀ and B₀ are saved as buffers
    (``init_A``, ``init_B``) so a reloaded adapter rebuilds the same residual base. Subclasses give
    the initial factors in :meth:`initial_factors`.
    """

    saved_buffers = ("init_A", "init_B")

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name, state=state)
        if state is None:
            a0, b0 = self.initial_factors(base, config, name)
            with torch.no_grad():
                self.lora_A.copy_(a0)
                self.lora_B.copy_(b0)
        else:
            a0, b0 = self.from_state(state, "init_A"), self.from_state(state, "init_B")
        self._buffer("init_A", a0)
        self._buffer("init_B", b0)
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() - self.init_delta())

    def initial_factors(self, base: nn.Module, config: AdapterConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A₀ r×n, B₀ m×r) for a fresh adapter."""
        raise NotImplementedError

    @torch.no_grad()
    def init_delta(self) -> torch.Tensor:
        return (self.init_B.float() @ self.init_A.float()) * self.scaling

"""SALT: scale-and-shift the top singular values, LoRA on the remaining subspace.

W = U_r diag(σ_r) V_rᵀ + W_rest. The top-r values become aᵢσᵢ + bᵢ (a = 1,
b = 0 at init, 2r parameters); W_rest, frozen in the base, gets a LoRA
(B = 0 at init, r_l(m+n) parameters). Output at init equals the base's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.tune.base import AdapterLayer, kaiming_a, layer_generator
from rankwise.tune.config import AdapterConfig
from rankwise.tune.pissa import top_svd


class SALTLayer(AdapterLayer):
    """y = W_rest x + U((a⊙σ + b) ⊙ Vᵀx) + (α/r_l)·B A x."""

    method = "salt"
    saved_buffers = ("U", "Vt", "sigma0")

    def __init__(
        self, base: nn.Module, config: AdapterConfig, name: str, state: dict[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(base, config, name)
        r = self.check_rank(config.r)
        rl = self.check_rank(config.lora_rank or config.r, "lora_rank")
        self._rank, self.lora_rank = r, rl
        self.scaling = config.lora_alpha / rl
        if state is None:
            u, s, v = top_svd(self.base_weight(), r, config)
            vt = v.T
            a = kaiming_a(rl, self.n, layer_generator(config, name))
            b = torch.zeros(self.m, rl)
            scale, shift = torch.ones(r), torch.zeros(r)
        else:
            u, vt, s = (self.from_state(state, k) for k in ("U", "Vt", "sigma0"))
            a, b = self.from_state(state, "lora_A"), self.from_state(state, "lora_B")
            scale, shift = self.from_state(state, "scale"), self.from_state(state, "shift")
        self._buffer("U", u)
        self._buffer("Vt", vt)
        self._buffer("sigma0", s)
        self.scale = self._param(scale)
        self.shift = self._param(shift)
        self.lora_A = self._param(a)
        self.lora_B = self._param(b)
        with torch.no_grad():
            self.set_base_weight(self.base_weight().float() - self.init_delta())

    @property
    def rank(self) -> int:
        return self._rank

    def _sigma(self) -> torch.Tensor:
        return self.scale * self.sigma0 + self.shift

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        top = F.linear(F.linear(x, self.Vt) * self._sigma(), self.U)
        return top + F.linear(F.linear(self._drop(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        top = (self.U.float() * self._sigma().float()) @ self.Vt.float()
        return top + (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def init_delta(self) -> torch.Tensor:
        return (self.U.float() * self.sigma0.float()) @ self.Vt.float()

    def closed_form_params(self) -> int:
        return 2 * self._rank + self.lora_rank * (self.m + self.n)

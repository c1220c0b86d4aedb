"""LoRA-GA (Wang et al. 2024): LoRA initialised from the SVD of the first gradients, scaled as the paper does.

Before training, the full-weight gradient G = ∂L/∂W of every targeted matrix
is averaged over ``config.init_batches`` training batches (the caller passes
them to :func:`rankwise.tune.apply`). With G = U S Vᵀ, the paper's default
("ArB2r") takes A₀ = V[:, :r]ᵀ and B₀ = U[:, r:2r], so that the first step of
LoRA reproduces the best rank-2r approximation of a full fine-tuning step, and
its *stable* scale multiplies both by ζ = m^¼/√γ (γ = ``config.ga_gamma``, 16)
so the output scale does not depend on the width. Only singular vectors enter
A₀, B₀ (no singular values), as in the reference code. The base keeps the
frozen residual W − s·B₀A₀ (s = α/r), so the output at init equals the
original model's; A₀, B₀ are stored like PiSSA's, which makes the trained
adapter an exact rank-2r LoRA on the original W for PEFT export.

(PEFT 0.21 also ships a LoRA-GA initialiser; it puts S into B₀ and scales B₀
only, which is not the paper's scheme, hence this implementation.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankwise.engine.svd import truncated_svd
from rankwise.errors import RankwiseError
from rankwise.tune.base import decomposition_threads
from rankwise.tune.config import AdapterConfig
from rankwise.tune.lora import FactorInitLoRALayer

GRAD_ATTR = "_rankwise_ga_grad"
"""Attribute of a base module holding its averaged m×n gradient while the adapter is built."""


class LoRAGALayer(FactorInitLoRALayer):
    """LoRA layout with the gradient-SVD init; r(m+n) trainable parameters."""

    method = "lora-ga"
    def initial_factors(self, base: nn.Module, config: AdapterConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rank
        grad = getattr(base, GRAD_ATTR, None)
        if grad is None:
            raise RankwiseError("lora-ga initialises from gradients: pass training batches, "
                                "rankwise.tune.apply(model, config, data=batches).")
        if 2 * r > min(self.m, self.n):
            raise RankwiseError(f"lora-ga needs 2·rank <= min(m, n) for {name} ({self.m}x{self.n}); "
                                f"choose --rank <= {min(self.m, self.n) // 2}.")
        with decomposition_threads(*grad.shape):
            u, _, v = truncated_svd(grad.float(), 2 * r, method=config.svd, niter=max(4, config.svd_iters),
                                    seed=config.seed)
        zeta = self.m ** 0.25 / math.sqrt(config.ga_gamma)
        return v[:, :r].T * zeta, u[:, r: 2 * r] * zeta

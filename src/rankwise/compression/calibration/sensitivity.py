"""Per-matrix loss sensitivity from output gradients (for the global allocator).

Dropping directions of matrix j perturbs its outputs by ΔY. To second order
(Gauss–Newton / empirical Fisher, assumed isotropic over the m outputs) the
calibration loss grows by about ½·s_j·‖ΔY‖_F² with s_j = mean squared gradient
of the loss w.r.t. one output element of matrix j. For ``whiten`` ‖ΔY‖_F² is
exactly the discarded σ², so s_j·σᵢ² puts every direction of every matrix in
the same unit (loss), which is what a global greedy allocation needs.

Only activation gradients are needed: all parameters are frozen and the
embedding output is made to require grad, so no weight gradients are formed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Target


def output_sensitivity(
    model: nn.Module, targets: list[Target], loss_loop: Callable[[nn.Module], Any]
) -> dict[str, float]:
    """Mean squared output gradient per element of each target, over ``loss_loop`` (which calls backward)."""
    acc: dict[str, list[float]] = {t.name: [0.0, 0.0] for t in targets}
    handles = []

    def fwd_hook(name: str):
        def hook(module: nn.Module, args: tuple, out) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:

                def g_hook(g: torch.Tensor) -> None:
                    acc[name][0] += float(g.detach().to(torch.float64).pow(2).sum())
                    acc[name][1] += g.numel()

                out.register_hook(g_hook)

        return hook

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise RankwiseError("loss sensitivity needs a model with input embeddings (a transformers model).")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handles.append(emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
    for t in targets:
        handles.append(t.module.register_forward_hook(fwd_hook(t.name)))
    try:
        loss_loop(model)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
    out = {}
    for name, (s, n) in acc.items():
        if n == 0:
            raise RankwiseError(
                f"no gradient reached {name}; sensitivity needs a forward loop that computes a loss and calls "
                "backward (text or token-window calibration does)."
            )
        out[name] = s / n
    return out

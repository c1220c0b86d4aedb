"""Per-matrix loss sensitivity from output gradients (for the global allocator).

Dropping directions of matrix j perturbs its outputs by ΔY. To second order
(Gauss–Newton / empirical Fisher, assumed isotropic over the m outputs) the
calibration loss grows by about ½·s_j·‖ΔY‖_F² with s_j = mean squared gradient
of the loss w.r.t. one output element of matrix j. For ``whiten`` ‖ΔY‖_F² is
exactly the discarded σ², so s_j·σᵢ² puts every direction of every matrix in
the same unit (loss), which is what a global greedy allocation needs.

Only activation gradients are needed: all parameters are frozen. The pipeline
streams this pass block by block (:meth:`rankwise.compression.runner.BlockRunner.backward`,
one window per backward); :func:`output_sensitivity` is the whole-model version
(models without repeated blocks, and the reference the streamed pass is tested against).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Target


class OutputGradMeter:
    """Sums of squared loss gradients w.r.t. each target's output, and their element counts (float64)."""

    def __init__(self, targets: list[Target]) -> None:
        self.names = [t.name for t in targets]
        self.sums = torch.zeros(len(targets), dtype=torch.float64)
        self.counts = torch.zeros(len(targets), dtype=torch.float64)
        self._index = {t.name: i for i, t in enumerate(targets)}

    @contextlib.contextmanager
    def hooks(self, targets: list[Target]) -> Iterator[None]:
        """Forward hooks on ``targets`` that meter the gradient of their outputs while active."""
        handles = [t.module.register_forward_hook(self._fwd_hook(self._index[t.name])) for t in targets]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _fwd_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, out) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:

                def g_hook(g: torch.Tensor) -> None:
                    self.sums[i] += float(g.detach().to(torch.float64).pow(2).sum())
                    self.counts[i] += g.numel()

                out.register_hook(g_hook)

        return hook

    def result(self) -> dict[str, float]:
        """Mean squared output gradient per target; a one-line error for a target no gradient reached."""
        out = {}
        for i, name in enumerate(self.names):
            if float(self.counts[i]) == 0:
                raise RankwiseError(
                    f"no gradient reached {name}; sensitivity needs a forward loop that computes a loss and calls "
                    "backward (text or token-window calibration does)."
                )
            out[name] = float(self.sums[i] / self.counts[i])
        return out


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` with ``requires_grad=False`` for the duration; flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def output_sensitivity(
    model: nn.Module, targets: list[Target], loss_loop: Callable[[nn.Module], Any]
) -> dict[str, float]:
    """Mean squared output gradient per element of each target, over ``loss_loop`` (which calls backward)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise RankwiseError("loss sensitivity needs a model with input embeddings (a transformers model).")
    meter = OutputGradMeter(targets)
    handle = emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True))
    try:
        with frozen(model), meter.hooks(targets):
            loss_loop(model)
    finally:
        handle.remove()
    return meter.result()

"""ReLoRA (Lialin et al. 2023): high-rank training through a sequence of merged low-rank updates.

* :class:`ReLoRA` (the model transform): every target becomes a
  :class:`~rankwise.train.regimes.layers.ReLoRALinear`: W frozen, LoRA factors B (zero) and A
  (Kaiming-uniform) trained with scale α/r (``lora_alpha``, default 32 as the paper); the other
  parameters (embeddings, norms, head) stay trainable, as in the paper.
* :class:`ReLoRACallback`: every ``every`` optimizer steps, W ← W + s·B A, the factors restart, and
  the optimizer state of the factors is *partially reset*: a fraction ``reset`` (0.99) of the entries of
  each Adam moment (``exp_avg``, ``exp_avg_sq``), the smallest in magnitude, are set to zero (the
  paper's magnitude pruning); the rest is kept.
* :func:`jagged_cosine_schedule`: linear warm-up, then cosine decay to ``min_lr_ratio`` over the run,
  with a short linear re-warm-up (``restart_warmup`` steps) after every merge, so the fresh factors
  do not take full-size steps on nearly empty moments.

The paper's optional full-rank warm start is not part of the regime: train a few steps with
``--regime dense`` first and start ReLoRA from that folder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Target
from rankwise.train.regimes import REGIMES
from rankwise.train.regimes.base import Regime, _unwrap
from rankwise.train.regimes.layers import ReLoRALinear

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


@torch.no_grad()
def magnitude_prune_(t: torch.Tensor, fraction: float) -> int:
    """Zero the ``fraction`` of entries of ``t`` smallest in magnitude (in place); returns how many were zeroed."""
    if fraction <= 0 or t.numel() == 0:
        return 0
    k = min(t.numel(), int(round(fraction * t.numel())))
    if k == 0:
        return 0
    flat = t.reshape(-1)
    drop = flat.abs().float().topk(k, largest=False).indices
    flat[drop] = 0
    return k


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter],
                          fraction: float) -> int:
    """ReLoRA's partial reset: prune ``fraction`` of each Adam moment of ``params`` by magnitude; entries zeroed."""
    if optimizer is None:
        return 0
    zeroed = 0
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in MOMENT_KEYS:
            if isinstance(state.get(key), torch.Tensor):
                zeroed += magnitude_prune_(state[key], fraction)
    return zeroed


def _jagged_factor(step: int, total: int, every: int, warmup: int, restart_warmup: int,
                   min_lr_ratio: float) -> float:
    def cosine(s: int) -> float:
        progress = min(1.0, max(0.0, (s - warmup) / max(1, total - warmup)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if step < warmup:
        return (step + 1) / (warmup + 1)
    since = step % every
    if step >= every and since < restart_warmup:
        return cosine(step - since + restart_warmup) * (since + 1) / (restart_warmup + 1)
    return cosine(step)


def jagged_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, every: int, warmup: int = 10,
                           restart_warmup: int = 10, min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """ReLoRA's jagged cosine: warm-up, cosine to ``min_lr_ratio``, re-warm-up of ``restart_warmup`` steps after
    every merge (steps ``every``, ``2·every``, ...); the re-warm-up climbs back to the cosine curve."""
    if every < 1 or total_steps < 1 or warmup < 0 or restart_warmup < 0 or not 0 <= min_lr_ratio <= 1:
        raise RankwiseError(f"jagged cosine schedule needs every, total_steps >= 1, warm-ups >= 0 and min_lr_ratio "
                            f"in [0, 1]; got every={every}, total_steps={total_steps}, warmup={warmup}, "
                            f"restart_warmup={restart_warmup}, min_lr_ratio={min_lr_ratio}.")

    def factor(step: int) -> float:
        return _jagged_factor(step, total_steps, every, warmup, restart_warmup, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ReLoRACallback(TrainerCallback, ExportableState):
    """Merge, restart and partially reset every ``every`` steps (HF ``TrainerCallback`` and plain-loop use).

    Plain loop: ``cb.on_step_end(model, step, optimizer=opt)`` after each ``optimizer.step()``.
    ``events`` lists every merge: step, layers merged, optimizer entries zeroed. It is an
    ``ExportableState``: a Trainer checkpoint stores the events and a resumed run
    (:func:`rankwise.training.train`) restores them. Nothing else needs restoring: the merged W, the
    factors and their (pruned) moments are in the checkpoint's weights and optimizer state, the jagged
    schedule's position in its scheduler state, and each restart is seeded by its step.
    """

    name = "relora"

    def __init__(self, every: int = 200, reset: float = 0.99, seed: int = 0) -> None:
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise RankwiseError(f"--relora-every must be a whole number of steps >= 1, got {every!r}.")
        if not 0.0 <= reset <= 1.0:
            raise RankwiseError(f"--relora-reset must lie in [0, 1], got {reset}.")
        self.every, self.reset, self.seed = int(every), float(reset), int(seed)
        self.events: list[dict[str, Any]] = []

    # Trainer checkpoints (transformers' ExportableState; restored by rankwise.training.rebuild) -------------
    def state(self) -> dict[str, Any]:
        """JSON-able ``{"args", "attributes"}`` stored in the checkpoint's trainer_state.json."""
        return {"args": {"every": self.every, "reset": self.reset, "seed": self.seed},
                "attributes": {"events": [dict(e) for e in self.events]}}

    def load_state(self, attributes: dict[str, Any]) -> None:
        """Restore the merge events :meth:`state` stored."""
        self.events = [dict(e) for e in attributes.get("events") or []]

    def rebuild(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """No structural change to replay (a merge keeps the layers); 0."""
        return 0

    def merge(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Merge every ReLoRALinear of ``model`` and prune its factors' optimizer state (one event)."""
        layers = [m for m in _unwrap(model).modules() if isinstance(m, ReLoRALinear)]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # the same restart on every process
        for layer in layers:
            layer.merge(gen)
        params = [p for layer in layers for p in (layer.A.weight, layer.B.weight)]
        zeroed = reset_optimizer_state(optimizer, params, self.reset)
        self.events.append({"step": step, "action": "merge", "layers": len(layers), "moments_zeroed": zeroed})

    def on_step_end(self, args: Any = None, state: Any = None, control: Any = None, **kwargs: Any) -> None:
        if isinstance(args, nn.Module):  # plain loop: on_step_end(model, step, optimizer=...)
            step, model, opt = int(state), args, kwargs.get("optimizer", control)
            total = kwargs.get("total_steps")
        else:
            model, opt = kwargs.get("model"), kwargs.get("optimizer")
            step, total = int(state.global_step), int(state.max_steps or 0) or None
        if model is None or step % self.every != 0 or (total is not None and step >= total):
            return None
        self.merge(model, step, opt)
        return None

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        return None


@REGIMES.register("relora")
class ReLoRA(Regime):
    """Frozen dense weights plus LoRA factors merged every ``relora_every`` steps (see the module doc)."""

    name = "relora"

    def __init__(self, rank: int = 128, targets: str | None = None, seed: int = 0, lora_alpha: float | None = None,
                 relora_every: int = 200, relora_reset: float = 0.99, relora_warmup: int = 10,
                 **_: Any) -> None:
        alpha = 32.0 if lora_alpha is None else float(lora_alpha)
        super().__init__(rank, targets, seed, lora_alpha=alpha, relora_every=int(relora_every),
                         relora_reset=float(relora_reset), relora_warmup=int(relora_warmup))
        self.scale = alpha / self.rank
        self.callback = ReLoRACallback(relora_every, relora_reset, seed)
        self.warmup = int(relora_warmup)

    def prepare(self, model: nn.Module) -> nn.Module:
        gen = self._generator()

        def make(t: Target, w: torch.Tensor) -> nn.Module:
            m, n = w.shape
            layer = ReLoRALinear(n, m, self.rank, scale=self.scale, bias=t.bias is not None,
                                 orig_kind="conv1d" if t.transposed else "linear", dtype=t.module.weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                if t.bias is not None:
                    layer.bias.copy_(t.bias.detach())
                layer.reset_factors(gen)
            return layer

        return self._swap(model, make)

    def callbacks(self) -> list[Any]:
        return [self.callback]

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        return jagged_cosine_schedule(optimizer, total_steps, self.callback.every, warmup=self.warmup,
                                      restart_warmup=self.warmup)

    def summary(self, model: nn.Module | None = None) -> dict[str, Any]:
        out = super().summary(model)
        out["merges"] = [e["step"] for e in self.callback.events]
        return out

"""The training loop behind ``rankwise train`` (and the benchmark).

Data: ``steps × batch_size`` windows of ``seq_len`` tokens drawn at seeded
random offsets from the training text (:func:`rankwise.io.tokens.sample_windows`,
BOS first), consumed in order, so two runs with the same seed see exactly the
same batches. Each step: causal-LM loss, backward, optional gradient clipping,
``optimizer.step()``, then every callback's ``on_step_end(model, step,
optimizer=...)``; at the end every callback's ``on_train_end(model)`` (TRP
factorises there). The progress bar shows the loss and the optimizer-state memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.io.tokens import sample_windows
from rankwise.progress import progress as progress_bar
from rankwise.train.memory import StateMemory, human_bytes, optimizer_state_bytes


@dataclass
class TrainResult:
    """What one training run did: losses, timings and optimizer-state memory."""

    steps: int
    batch_size: int
    seq_len: int
    tokens: int
    losses: list[float]
    step_seconds: list[float]
    refresh_seconds: list[float]
    state: StateMemory | None
    peak_state_bytes: int
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean loss over the last min(5, steps) steps (less noisy than the very last batch)."""
        tail = self.losses[-min(5, len(self.losses)) :]
        return float(sum(tail) / len(tail))

    @property
    def seconds_per_step(self) -> float:
        """Median wall time per step (robust to a slow first step or a busy machine)."""
        s = sorted(self.step_seconds)
        return float(s[len(s) // 2]) if s else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_loss"] = self.final_loss
        d["seconds_per_step"] = self.seconds_per_step
        return d


def training_windows(
    tokenizer, text: str, steps: int, batch_size: int, seq_len: int, seed: int = 0, name: str = "train text"
) -> torch.Tensor:
    """(steps·batch_size, seq_len) token windows at seeded random offsets of ``text``."""
    if steps < 1:
        raise RankwiseError(f"--steps must be at least 1, got {steps}.")
    if batch_size < 1:
        raise RankwiseError(f"--batch-size must be at least 1, got {batch_size}.")
    if seq_len < 2:
        raise RankwiseError(f"--seq-len must be at least 2, got {seq_len}.")
    return sample_windows(tokenizer, text, steps * batch_size, seq_len, seed=seed, name=name)


def causal_lm_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a Hugging Face causal LM on a batch of token ids."""
    return model(input_ids=x, labels=x).loss


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: torch.Tensor,
    batch_size: int,
    callbacks: Sequence[Any] = (),
    grad_clip: float | None = 1.0,
    progress: bool = True,
    desc: str = "train",
    scheduler: Any = None,
) -> TrainResult:
    """Train on ``windows`` in order, ``batch_size`` rows per step; returns a :class:`TrainResult`.

    Raises RankwiseError when the loss becomes NaN/inf (lower --lr).
    """
    steps = len(windows) // batch_size
    if steps < 1:
        raise RankwiseError(f"{len(windows)} windows are fewer than one batch of {batch_size}.")
    device = next(model.parameters()).device
    model.train()
    for cb in callbacks:
        cb.on_train_begin(model)
    losses: list[float] = []
    times: list[float] = []
    peak = 0
    state: StateMemory | None = None
    refresh = getattr(optimizer, "refresh_seconds", None)
    n_refresh0 = len(refresh) if isinstance(refresh, list) else 0
    bar = progress_bar(steps, desc=desc, unit="step", leave=True) if progress else None
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            x = windows[(step - 1) * batch_size : step * batch_size].to(device)
            loss = causal_lm_loss(model, x)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RankwiseError(f"the loss became {value} at step {step}; lower --lr (e.g. by 10x).")
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for cb in callbacks:
                cb.on_step_end(model, step, optimizer=optimizer)
            times.append(time.perf_counter() - t0)
            losses.append(value)
            state = optimizer_state_bytes(optimizer)
            peak = max(peak, state.total)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", state=human_bytes(state.total))
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    events: list[dict[str, Any]] = []
    for cb in callbacks:
        cb.on_train_end(model)
        events.extend(getattr(cb, "events", []))
    return TrainResult(
        steps=steps,
        batch_size=batch_size,
        seq_len=int(windows.shape[1]),
        tokens=steps * batch_size * int(windows.shape[1]),
        losses=losses,
        step_seconds=times,
        refresh_seconds=list(refresh[n_refresh0:]) if isinstance(refresh, list) else [],
        state=state,
        peak_state_bytes=peak,
        events=events,
    )

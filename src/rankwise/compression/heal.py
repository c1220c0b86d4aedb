"""Healing as a compression stage: a short LoRA on the factors, folded back into them.

``CompressConfig(heal_steps=N)`` (CLI ``--heal-steps N``) runs after factorisation:

1. PEFT's LoRA (``peft.get_peft_model``, rank ``heal_rank``, α = 2·rank, no dropout) on the two
   child ``nn.Linear`` of every :class:`~rankwise.surgery.lowrank.LowRankLinear`: ``A`` (k×n) and
   ``B`` (m×k). The effective weight is (B + ΔB)(A + ΔA);
2. ``N`` optimizer steps of the causal-LM loss through the one training loop,
   :func:`rankwise.training.train` (the HF Trainer: AdamW, linear decay, gradient clipping), on
   seeded windows of the calibration spec's *train* split (the same text or mixture as
   ``calib``, other windows: seed ``seed + HEAL_SEED_OFFSET``);
3. PEFT's ``merge_and_unload`` folds ΔA into A and ΔB into B.

Why LoRA on the factors rather than a LoRA beside the whole layer: folding a LoRA ``b a`` of the
whole weight into ``B A`` gives rank k + r, which costs r(m+n) parameters per layer: the asked
ratio would no longer hold and some layers would cross their break-even rank (then r_l =
min(r, break_even − 1 − k) per layer, or a lossy re-truncation). A LoRA on each factor folds
*exactly* into factors of the same shapes: every rank, the parameter count and the achieved ratio
stay what the allocator chose (so no layer can exceed its break-even rank), and the folded model
computes what the trained one did. It is also SVD-LLM's healing recipe (LoRA on W_u and W_v).

Memory: training needs the whole compressed model (activations for backward), so the streamed
path (:func:`rankwise.compression.streaming.compress_checkpoint`) loads its own finished output
(``rankwise.load``, a factorised and therefore smaller model than the dense one), heals it and
rewrites the folder before the atomic commit (:func:`heal_folder`); the dense model is never
whole in memory.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import LowRankLinear

HEAL_SEED_OFFSET = 1_000_003
"""Healing windows are drawn with ``seed + HEAL_SEED_OFFSET`` (other windows than the calibration's)."""


@dataclass
class HealResult:
    """What a healing stage did (recorded in ``rankwise.json`` under ``healing``)."""

    steps: int
    rank: int
    lr: float
    batch_size: int
    layers: int
    trainable_params: int
    losses: list[float]
    seconds: float
    data: dict = field(default_factory=dict)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["losses"]
        d["first_loss"], d["final_loss"] = self.first_loss, self.final_loss
        d["folded"] = "LoRA on each factor merged into A and B: ranks and parameter count unchanged"
        return d


def lowrank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    """{module name: LowRankLinear} of ``model`` (the layers healing adapts)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def attach_lora(model: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Wrap ``model`` in PEFT's LoRA on the A and B child Linears of every LowRankLinear; returns the PeftModel.

    Each factor's LoRA rank is min(``rank``, k): a k×n (or m×k) update has rank ≤ k, more would only add
    parameters. ``alpha`` defaults to 2·rank. Everything but the LoRA parameters is frozen (PEFT).
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RankwiseError(f"heal_rank must be a whole number ≥ 1, got {rank!r}.")
    layers = lowrank_layers(model)
    if not layers:
        raise RankwiseError("healing adapts the factorised layers, and the model has none (every targeted matrix "
                            "was kept dense); compress with a larger ratio or drop --heal-steps.")
    targets = [f"{n}.{c}" for n in layers for c in ("A", "B")]
    pattern = {re.escape(f"{n}.{c}"): layer.rank for n, layer in layers.items() for c in ("A", "B")
               if layer.rank < rank}
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                     target_modules=targets, rank_pattern=pattern, alpha_pattern={k: 2 * v for k, v in pattern.items()}
                     if alpha is None else {}, bias="none")
    return get_peft_model(model, cfg)


@torch.no_grad()
def fold_lora(peft_model: nn.Module) -> nn.Module:
    """Merge the LoRA of each factor into it (PEFT's ``merge_and_unload``); returns the plain model.

    The ranks (and so the parameter count) are checked unchanged: folding a LoRA on A (k×n) and on B
    (m×k) keeps both shapes, so no layer can pass its break-even rank.
    """
    base = peft_model.get_base_model()
    before = {n: (m.rank, m.in_features, m.out_features) for n, m in lowrank_layers(base).items()}
    model = peft_model.merge_and_unload()
    after = {n: (m.rank, m.in_features, m.out_features) for n, m in lowrank_layers(model).items()}
    if before != after:  # a bug, not a user error
        raise RuntimeError("rankwise bug: folding the healing LoRA changed the factorised layers' shapes")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def heal_windows(config: Any, tokenizer=None, windows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Token windows for ``config.heal_steps`` × ``config.heal_batch_size`` training sequences.

    From ``config.calib``'s train split (a mixture keeps its weights), seed ``seed + HEAL_SEED_OFFSET``;
    or, when the calibration was given as token windows, those windows (repeated as needed).
    """
    n = config.heal_steps * config.heal_batch_size
    if windows is not None:
        reps = math.ceil(n / windows.shape[0])
        rows = windows.repeat(reps, 1)[:n]
        return rows, {"text": "<token windows>", "samples": n, "seq_len": int(windows.shape[1])}
    if tokenizer is None:
        raise RankwiseError("healing needs a tokenizer for its training text; pass tokenizer=... or token windows "
                            "as calib.")
    from rankwise.compression.calibration.loops import text_windows

    rows, info = text_windows(tokenizer, config.calib, n, config.seq_len, config.seed + HEAL_SEED_OFFSET)
    return rows, {**info.to_dict(), "split": "train"}


class _Rows(torch.utils.data.Dataset):
    """Fixed token windows as causal-LM examples (labels = inputs)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def check_heal_supported(config: Any) -> None:
    """Healing runs in one process: under ``torchrun`` it is a one-line error (before any work)."""
    from rankwise.compression.distributed import Dist

    if getattr(config, "heal_steps", 0) and Dist.current(getattr(config, "device", None)).enabled:
        raise RankwiseError("--heal-steps runs in one process and is not supported under torchrun; compress with "
                            "torchrun, then heal the output in one process (rankwise tune --method heal).")


def heal(model: nn.Module, config: Any, tokenizer=None, windows: torch.Tensor | None = None) -> HealResult:
    """Heal the compressed ``model`` in place: LoRA on its factors, ``config.heal_steps`` steps, folded.

    ``config``: a :class:`~rankwise.compression.api.CompressConfig` (``heal_steps``, ``heal_rank``,
    ``heal_lr``, ``heal_batch_size``, ``calib``, ``seq_len``, ``seed``, ``device``, ``progress``).
    ``windows``: token windows to train on instead of the calibration text. Returns what was done;
    the model keeps its device and its factorised layers' ranks.
    """
    from rankwise.training import TrainConfig, lm_collate, train

    if config.heal_steps < 1:
        raise RankwiseError(f"heal_steps must be ≥ 1 to heal, got {config.heal_steps}.")
    check_heal_supported(config)
    t0 = time.perf_counter()
    rows, data = heal_windows(config, tokenizer, windows)
    home = next(model.parameters()).device
    was_training = model.training
    peft_model = attach_lora(model, config.heal_rank)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    cfg = TrainConfig(task="lm", steps=config.heal_steps, lr=config.heal_lr, batch_size=config.heal_batch_size,
                      seq_len=max(8, rows.shape[1]), seed=config.seed, device=config.device)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(quantiz|PEFT|peft).*")
            res = train(peft_model, _Rows(rows), cfg, collator=lm_collate, progress=config.progress)
    except BaseException:
        peft_model.unload()  # leave the model as it was: no LoRA layers
        raise
    fold_lora(peft_model)
    if hasattr(model, "peft_config"):  # PEFT leaves its config on the unwrapped model
        del model.peft_config
    model.to(home)
    model.train(was_training)
    return HealResult(steps=res.steps, rank=config.heal_rank, lr=config.heal_lr, batch_size=config.heal_batch_size,
                      layers=len(lowrank_layers(model)), trainable_params=trainable, losses=res.losses,
                      seconds=time.perf_counter() - t0, data=data)


def heal_folder(folder: str | Path, config: Any, tokenizer=None, windows: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> HealResult:
    """Heal the rankwise checkpoint in ``folder`` (a streamed compress's finished output) and rewrite it.

    Loads it (``rankwise.load``; float32 on the CPU, where bf16/fp16 arithmetic is emulated, else its
    own dtype), heals (:func:`heal`), and writes the folded model back in ``dtype`` (default: the
    checkpoint's) through ``rankwise.save`` into a scratch folder beside it whose files then replace
    the folder's. Call it on a folder that is still staged (not yet committed): the caller's atomic
    commit makes the healed version appear at once or not at all.
    """
    import os
    import shutil
    import tempfile

    from rankwise.engine.device import resolve_device
    from rankwise.io.checkpoint import load, save

    folder = Path(folder)
    model = load(folder, verify=False)
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    if resolve_device(config.device).type == "cpu" and dtype != torch.float32:
        model.to(torch.float32)
    result = heal(model, config, tokenizer=tokenizer, windows=windows)
    model.to(dtype)
    meta = dict(getattr(model, "rankwise_meta", {}) or {})
    meta["healing"] = result.to_dict()
    scratch = Path(tempfile.mkdtemp(prefix=".rankwise-heal-", dir=folder.parent))
    try:
        save(model, scratch / "healed", meta=meta, tokenizer=tokenizer,
             max_shard_size=getattr(config, "max_shard_size", "5GB"))
        del model
        for f in list(folder.iterdir()):
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
        for f in (scratch / "healed").iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result

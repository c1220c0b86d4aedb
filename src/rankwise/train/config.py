"""``TrainRunConfig``: what ``rankwise train`` trains and how (docs/methods.md §5).

The dataclass validates itself in ``__post_init__`` (one-line :class:`RankwiseError`)
and feeds the ``rankwise train`` options through
:func:`rankwise.config.add_config_arguments`, so each default is written once, here.
The optimisers, callbacks and projections are chosen by name from the
:class:`rankwise.registry.Registry` objects below, which also give the CLI its
``choices``. This module imports no torch: the builders import it when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rankwise.config import check_int, check_numbers
from rankwise.errors import RankwiseError
from rankwise.registry import Registry
from rankwise.train.regimes import REGIMES, check_combination

# name → builder(model, config) -> torch optimiser over the model's trainable parameters
OPTIMIZERS: Registry[Callable[[Any, TrainRunConfig], Any]] = Registry("optimizer")
# name → builder(config) -> callback object (rankwise.train.callbacks)
CALLBACKS: Registry[Callable[[TrainRunConfig], Any]] = Registry("callback")
# name → one-line description; rankwise.train.projector.Projector implements each
PROJECTIONS: Registry[str] = Registry("projection")
PROJECTIONS.register("svd", "GaLore: top singular vectors of the gradient (exact SVD)")
PROJECTIONS.register("randomized", "top singular vectors from torch.svd_lowrank")
PROJECTIONS.register("dct", "fixed DCT basis, columns chosen by gradient energy")


@dataclass
class TrainRunConfig:
    """Configuration of one ``rankwise train`` run.

    Attributes:
        steps: optimiser steps (required; at least 1).
        model: built-in name or model folder (``None``: smollm2-135m).
        optimizer: one of :data:`OPTIMIZERS` (adamw, galore, galore-dct, fira); ``None``: galore for the dense
            regime, adamw for the others.
        projection: projection of the low-rank optimisers (``None``: svd, dct for galore-dct).
        rank, update_gap, scale: GaLore's projection rank, refresh period in steps and scale α.
        targets: regex of module names in the low-rank group / shaped by the callback (``None``: all).
        callback: one of :data:`CALLBACKS` (trp, cuttlefish) or ``None``.
        trp_lam, trp_every, trp_energy: TRP's nuclear-norm step λ, truncation period, energy kept.
        cf_check_every, cf_tol: Cuttlefish's stable-rank check period and settle tolerance.
        from_scratch: random init from the model's config (seeded) instead of the pretrained weights.
        data: training text: ptb, bbc or a .txt file (train split).
        lr: learning rate (``None``: 1e-3 from scratch, else 1e-4; see :attr:`learning_rate`).
        weight_decay, batch_size, seq_len, seed: decoupled weight decay, windows per step, tokens per
            window, seed of the init and the data order.
        eval_tokens, eval_seq_len: PTB-test tokens for the final perplexity (0 skips) and its window length.
        regime, sparse_density, lora_alpha: the weights' regime (:data:`rankwise.train.regimes.REGIMES`: dense,
            sltrain, relora, lost), the sparse support's density and the low-rank scale α (α/rank).
        relora_every, relora_reset, relora_warmup: ReLoRA's merge period, fraction of the factors' Adam
            moments pruned at a merge, and the warm-up steps of its jagged cosine schedule.
        fsdp: shard parameters, gradients and optimizer state over the torchrun processes (FSDP2).
    """

    steps: int = field(metadata={"help": "optimiser steps", "cli": "--steps"})  # required: added by the CLI
    model: str | None = field(default=None, metadata={"cli": False})
    optimizer: str | None = field(default=None, metadata={
        "help": "optimiser (default: galore; adamw with a --regime other than dense)", "choices": OPTIMIZERS.names})
    projection: str | None = field(default=None, metadata={
        "help": "projection of the low-rank optimisers (default: svd; dct for galore-dct)",
        "choices": PROJECTIONS.names})
    rank: int = field(default=128, metadata={"help": "projection rank"})
    update_gap: int = field(default=200, metadata={"help": "steps between projection refreshes"})
    scale: float = field(default=0.25, metadata={"help": "GaLore scale α of the low-rank update"})
    targets: str | None = field(default=None, metadata={
        "help": "regex of module names in the low-rank group (default all)"})
    callback: str | None = field(default=None, metadata={"help": "rank-shaping callback",
                                                          "choices": CALLBACKS.names})
    trp_lam: float = field(default=1e-4, metadata={"help": "TRP nuclear-norm step λ per step"})
    trp_every: int = field(default=10, metadata={"help": "TRP truncation period in steps"})
    trp_energy: float = field(default=0.99, metadata={"help": "TRP energy kept at truncation"})
    cf_check_every: int = field(default=5, metadata={"help": "Cuttlefish stable-rank check period"})
    cf_tol: float = field(default=0.02, metadata={"help": "Cuttlefish relative change counted as settled"})
    from_scratch: bool = field(default=False, metadata={"help": "random init from the model's config (seeded)"})
    data: str = field(default="ptb", metadata={"help": "training text: ptb, bbc or a .txt file (train split)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (1e-3 from scratch, else 1e-4)"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay"})
    batch_size: int = field(default=4, metadata={"help": "windows per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training window"})
    seed: int = field(default=0, metadata={"help": "seed of the init and the data order"})
    eval_tokens: int = field(default=2048, metadata={"help": "PTB-test tokens for perplexity (0 skips)"})
    eval_seq_len: int = field(default=512, metadata={"help": "perplexity window length"})
    regime: str = field(default="dense", metadata={
        "help": "what the weights are while training: dense, sltrain (BA + fixed random sparse S), relora (frozen W + "
                "LoRA merged every --relora-every steps), lost (SVD low-rank + channel-sparse); see docs/train.md",
        "choices": REGIMES.names})
    sparse_density: float = field(default=0.03, metadata={
        "help": "sltrain: fraction of entries in the sparse support; lost: fraction of input channels"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "low-rank scale alpha/rank of sltrain (default 16) and relora (default 32)"})
    relora_every: int = field(default=200, metadata={"help": "relora: steps between merges"})
    relora_reset: float = field(default=0.99, metadata={
        "help": "relora: fraction of the factors' Adam moments pruned (by magnitude) at each merge"})
    relora_warmup: int = field(default=10, metadata={
        "help": "relora: learning-rate warm-up steps at the start and after each merge (jagged cosine)"})
    fsdp: bool = field(default=False, metadata={
        "help": "shard parameters, gradients and optimizer state over the processes (FSDP2); launch with "
                "torchrun --nproc-per-node N -m rankwise train --fsdp ... (under torchrun without --fsdp the "
                "processes train with DDP)"})

    def __post_init__(self) -> None:
        check_numbers(self)
        check_int(self.steps, "--steps", minimum=1)
        REGIMES.check(self.regime)
        if self.optimizer is None:  # resolved once here: every reader sees a name
            self.optimizer = "galore" if self.regime == "dense" else "adamw"
        OPTIMIZERS.check(self.optimizer)
        if self.projection is not None:
            PROJECTIONS.check(self.projection)
        if self.callback is not None:
            CALLBACKS.check(self.callback)
        if self.optimizer != "adamw" or self.regime != "dense":
            from rankwise.train.projector import check_gap, check_rank

            check_rank(self.rank)
            check_gap(self.update_gap)
        check_combination(self.regime, self.optimizer, self.callback, self.fsdp, self.from_scratch,
                          self.sparse_density)
        check_int(self.relora_every, "--relora-every", minimum=1)
        check_int(self.relora_warmup, "--relora-warmup", minimum=0)
        if not 0.0 <= self.relora_reset <= 1.0:
            raise RankwiseError(f"--relora-reset must lie in [0, 1], got {self.relora_reset}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise RankwiseError(f"--lora-alpha must be positive, got {self.lora_alpha}.")
        if self.lr is not None and self.lr <= 0:
            raise RankwiseError(f"--lr must be positive, got {self.lr}.")
        if self.weight_decay < 0:
            raise RankwiseError(f"--weight-decay must be 0 or more, got {self.weight_decay}.")
        check_int(self.eval_tokens, "--eval-tokens", minimum=0)
        for flag, value in (("--batch-size", self.batch_size), ("--seq-len", self.seq_len),
                            ("--eval-seq-len", self.eval_seq_len), ("--trp-every", self.trp_every),
                            ("--cf-check-every", self.cf_check_every)):
            check_int(value, flag, minimum=1)
        if self.trp_lam < 0:
            raise RankwiseError(f"--trp-lam must be 0 or more, got {self.trp_lam}.")
        if not 0.0 < self.trp_energy <= 1.0:
            raise RankwiseError(f"--trp-energy must lie in (0, 1], got {self.trp_energy}.")
        if self.cf_tol < 0:
            raise RankwiseError(f"--cf-tol must be 0 or more, got {self.cf_tol}.")
        if self.fsdp and self.callback:
            raise RankwiseError(
                f"--callback {self.callback} takes SVDs of whole weight matrices, which --fsdp never holds; run it "
                "under torchrun without --fsdp (DDP) or in one process."
            )

    @property
    def learning_rate(self) -> float:
        """``lr``, or its default: 1e-3 from scratch, else 1e-4."""
        return self.lr if self.lr is not None else (1e-3 if self.from_scratch else 1e-4)

    @property
    def resolved_projection(self) -> str | None:
        """The projection the optimiser uses (``None`` for adamw)."""
        if self.optimizer == "adamw":
            return None
        return self.projection or ("dct" if self.optimizer == "galore-dct" else "svd")


@OPTIMIZERS.register("adamw")
def _adamw(model: Any, config: TrainRunConfig) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.learning_rate, eps=1e-6, weight_decay=config.weight_decay)


def _galore(model: Any, config: TrainRunConfig) -> Any:
    from rankwise.train.galore import GaLoreAdamW, galore_param_groups

    groups = galore_param_groups(
        model, rank=config.rank, update_proj_gap=config.update_gap, scale=config.scale, targets=config.targets,
        projection=config.resolved_projection, fira=config.optimizer == "fira",
    )
    return GaLoreAdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, seed=config.seed)


for _name in ("galore", "galore-dct", "fira"):
    OPTIMIZERS.register(_name, _galore)


@CALLBACKS.register("trp")
def _trp(config: TrainRunConfig) -> Any:
    from rankwise.train.callbacks import TRP

    return TRP(lam=config.trp_lam, every=config.trp_every, energy=config.trp_energy, targets=config.targets)


@CALLBACKS.register("cuttlefish")
def _cuttlefish(config: TrainRunConfig) -> Any:
    from rankwise.train.callbacks import Cuttlefish

    return Cuttlefish(check_every=config.cf_check_every, tol=config.cf_tol, targets=config.targets)


def build_optimizer(model: Any, config: TrainRunConfig) -> Any:
    """The optimiser ``config.optimizer`` names, over ``model``'s trainable parameters."""
    return OPTIMIZERS.get(config.optimizer)(model, config)


def build_regime(config: TrainRunConfig) -> Any:
    """The ``config.regime`` (:class:`rankwise.train.regimes.base.Regime`) with the run's rank, targets and seed."""
    from rankwise.train.regimes.base import build_regime as build

    return build(config.regime, rank=config.rank, targets=config.targets, seed=config.seed,
                 sparse_density=config.sparse_density, lora_alpha=config.lora_alpha,
                 relora_every=config.relora_every, relora_reset=config.relora_reset,
                 relora_warmup=config.relora_warmup)


def build_callback(config: TrainRunConfig) -> Any:
    """The ``config.callback`` object, or ``None``."""
    return None if config.callback is None else CALLBACKS.get(config.callback)(config)

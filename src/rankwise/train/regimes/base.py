"""The regime protocol, the ``dense`` regime, and dense export of a regime-trained model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.modules import set_module
from rankwise.surgery.targets import Target, find_targets
from rankwise.train.regimes import REGIMES


class Regime:
    """A training regime: a model transform, Trainer callbacks and (optionally) a learning-rate schedule.

    Use::

        regime = build_regime("sltrain", rank=64, sparse_density=0.03)
        regime.prepare(model)                      # swaps the target matrices in place
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        sched = regime.scheduler(opt, total_steps)  # None: keep the loop's own
        Trainer(model, ..., optimizers=(opt, sched), callbacks=regime.callbacks())
    """

    name = "dense"

    def __init__(self, rank: int = 128, targets: str | None = None, seed: int = 0, **options: Any) -> None:
        self.rank, self.targets, self.seed = int(rank), targets, int(seed)
        self.options = options
        self.replaced: dict[str, dict[str, Any]] = {}
        self.dense_params: int | None = None

    # -- the protocol ------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Transform ``model`` in place (the dense regime leaves it as it is); returns it."""
        self.dense_params = sum(p.numel() for p in model.parameters())
        return model

    def callbacks(self) -> list[Any]:
        """Callbacks for ``transformers.Trainer`` (also callable from a plain loop)."""
        return []

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """A learning-rate scheduler the regime needs, or None to keep the loop's."""
        return None

    def summary(self, model: nn.Module | None = None) -> dict[str, Any]:
        """JSON-able record: the regime, its options, the replaced layers and the parameter counts."""
        out: dict[str, Any] = {"regime": self.name, "rank": None if self.name == "dense" else self.rank,
                               **{k: v for k, v in self.options.items()}, "layers_replaced": len(self.replaced),
                               "dense_parameters": self.dense_params}
        if model is not None:
            out["parameters"] = sum(p.numel() for p in model.parameters())
            out["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            out["index_bytes"] = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                                     if n.endswith("sparse_index"))
        return out

    # -- helpers for subclasses -------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _swap(self, model: nn.Module, make: Callable[[Target, torch.Tensor], nn.Module]) -> nn.Module:
        """Replace every target matrix ``t`` (m×n weight ``w``, float32) by ``make(t, w)``, in module order."""
        from rankwise.train.projector import check_rank

        self.dense_params = sum(p.numel() for p in model.parameters())
        targets = find_targets(model, self.targets)
        for t in targets:  # every rank error before any swap
            check_rank(self.rank, t.shape, t.name)
        for t in targets:
            w = t.weight().float()
            layer = make(t, w).to(device=t.module.weight.device)
            set_module(model, t.name, layer)
            self.replaced[t.name] = layer.spec()
        from rankwise.io.checkpoint import mark_factorised

        return mark_factorised(model)  # save_pretrained / Trainer checkpoints write a rankwise/2 folder


@REGIMES.register("dense")
class Dense(Regime):
    """The model as it is."""

    name = "dense"


def build_regime(name: str, **kwargs: Any) -> Regime:
    """The regime ``name`` (one of :data:`REGIMES`) with its options (rank, targets, seed, regime options)."""
    return REGIMES.get(name)(**kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def to_dense(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every regime layer (and LowRankLinear) replaced by the plain layer computing the same map; unmarked."""
    from rankwise.io.checkpoint import to_dense as checkpoint_to_dense

    return checkpoint_to_dense(model, inplace=inplace)


def export_dense(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write a plain transformers folder (``from_pretrained`` without rankwise) of a regime-trained model."""
    from rankwise.io.checkpoint import export_dense as write_dense

    dense = to_dense(model)
    if any(getattr(type(m), "layer_type", None) for m in dense.modules()):
        raise RankwiseError("the model still holds layers without a dense form after export; "
                            "export them with their own tool (e.g. rankwise quantize's --export-dense).")
    return write_dense(dense, path, tokenizer=tokenizer, overwrite=overwrite)


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """``nn.Linear``'s default init (Kaiming-uniform with a = √5: U(±1/√fan_in)), from a seeded generator."""
    bound = 1.0 / fan_in**0.5
    return torch.rand(shape, generator=generator).mul_(2 * bound).sub_(bound)

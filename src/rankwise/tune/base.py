"""The common layer machinery shared by every adapter (PEFT's ``LoraLayer`` split, generalised).

An adapter layer wraps the original module (``self.base``, frozen) and adds a
trainable path. Two families exist:

* **dense-base adapters** (lora, pissa, svfit, salt, sorsa, loldu) wrap an
  ``nn.Linear`` / ``Conv1D``. Spectral ones move the part of W they train into
  the adapter at init, so the base holds a frozen residual W_res = W − W_init
  (``init_delta``) and the output at init equals the original model.
  ``delta_weight()`` is the adapter's m×n contribution on top of the stored
  base weight, so ``merge`` is W_base += Δ and ``unmerge`` is W_base −= Δ.
* **factor adapters** (welore-lrc, heal) wrap a :class:`LowRankLinear` and
  train copies of its factors; ``merge`` writes them into the base layer.

Every layer knows its trainable-parameter count in closed form
(:meth:`closed_form_params`), which tests compare with the real count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.engine.threads import torch_threads
from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.targets import Target
from rankwise.tune.config import AdapterConfig


class AdapterLayer(nn.Module):
    """Base class: a frozen ``base`` module plus a trainable adapter path.

    Subclasses set :attr:`method`, build their tensors in ``__init__`` (from the
    base weight, or from ``state`` when loading a saved adapter) and implement
    :meth:`adapter_forward`, :meth:`delta_weight` and :meth:`closed_form_params`.
    """

    method: ClassVar[str] = ""
    #: names of buffers (frozen tensors) written to adapter.safetensors besides the parameters
    saved_buffers: ClassVar[tuple[str, ...]] = ()
    #: True for adapters whose base must be a LowRankLinear (welore-lrc, heal)
    wraps_lowrank: ClassVar[bool] = False

    def __init__(self, base: nn.Module, config: AdapterConfig, name: str) -> None:
        super().__init__()
        self.base = base
        self.layer_name = name
        self.merged = False
        self.dropout_p = float(config.dropout)
        if isinstance(base, LowRankLinear):
            self.m, self.n = base.out_features, base.in_features
            self.transposed = False
        else:
            t = Target(name, base)
            self.m, self.n = t.shape
            self.transposed = t.transposed
        for p in base.parameters():
            p.requires_grad_(False)
        self.train(base.training)  # a new module starts in training mode; follow the model's (DyLoRA's draws)

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def base_weight(self) -> torch.Tensor:
        """The base module's m×n weight (a detached view)."""
        return Target(self.layer_name, self.base).weight()

    def set_base_weight(self, w: torch.Tensor) -> None:
        Target(self.layer_name, self.base).set_weight(w)

    def check_rank(self, rank: int, what: str = "rank") -> int:
        """0 < rank < min(m, n), else a one-line error naming the layer."""
        p = min(self.m, self.n)
        if rank <= 0 or rank >= p:
            raise RankwiseError(
                f"{what} {rank} is invalid for {self.layer_name} ({self.m}x{self.n}): it must satisfy "
                f"0 < {what} < min(m, n) = {p}; choose a smaller --rank or other --targets."
            )
        return rank

    def _param(self, t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.detach().to(device=self.device, dtype=self.weight_dtype).clone().contiguous())

    def _buffer(self, name: str, t: torch.Tensor) -> None:
        # non-persistent: the model's own state_dict stays that of the base model plus parameters;
        # adapter files are written by save_adapter, which knows saved_buffers.
        self.register_buffer(name, t.detach().to(device=self.device, dtype=self.weight_dtype).clone().contiguous(),
                             persistent=False)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x

    @staticmethod
    def from_state(state: dict[str, torch.Tensor] | None, key: str) -> torch.Tensor:
        if state is None or key not in state:
            raise RankwiseError(f"the adapter file lacks tensor {key!r}; it is incomplete, save it again.")
        return state[key]

    # -- interface ---------------------------------------------------------------------------------
    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter path's output (added to ``base(x)``)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """m×n contribution of the adapter on top of the stored base weight."""
        raise NotImplementedError

    def init_delta(self) -> torch.Tensor | None:
        """What init moved from W into the adapter (W_original = W_base + init_delta); None if nothing."""
        return None

    def closed_form_params(self) -> int:
        """Trainable parameters of this layer, from the method's formula."""
        raise NotImplementedError

    def regularization(self) -> torch.Tensor | None:
        """An extra loss term (SORSA's orthogonality penalty); None for most adapters."""
        return None

    @property
    def rank(self) -> int:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.adapter_forward(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W_base += ΔW; afterwards the layer costs one matmul like the dense one."""
        if self.merged:
            raise RankwiseError(f"{self.layer_name} is already merged; call unmerge first (merge twice is an error).")
        w = self.base_weight()
        self.set_base_weight(w.float() + self.delta_weight().float())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W_base −= ΔW (restores the pre-merge base within float rounding)."""
        if not self.merged:
            raise RankwiseError(f"{self.layer_name} is not merged; nothing to unmerge.")
        w = self.base_weight()
        self.set_base_weight(w.float() - self.delta_weight().float())
        self.merged = False

    @torch.no_grad()
    def original_module(self) -> nn.Module:
        """The base module with its original weight put back (removes the adapter's effect)."""
        if self.merged:
            self.unmerge()
        d = self.init_delta()
        if d is not None:
            self.set_base_weight(self.base_weight().float() + d.float())
        return self.base

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors written to the adapter file: every parameter and the buffers in :attr:`saved_buffers`."""
        out = {k: v.detach() for k, v in self.named_parameters(recurse=False)}
        for k in self.saved_buffers:
            out[k] = getattr(self, k).detach()
        return out

    def extra_repr(self) -> str:
        return f"method={self.method}, m={self.m}, n={self.n}, rank={self.rank}, merged={self.merged}"


@contextlib.contextmanager
def decomposition_threads(m: int, n: int, limit: int = 2048) -> Iterator[None]:
    """Run small per-matrix decompositions (SVD, LU) single-threaded on CPU.

    LAPACK's multi-threaded SVD gains little below ~2k×2k, and on an
    oversubscribed machine its OpenMP threads spin against each other: we
    measured 14 s with 2 threads versus 0.12 s with 1 for a 1536×384 SVD on two
    shared cores. Larger matrices keep torch's thread setting.
    """
    with torch_threads(1 if max(m, n) <= limit else None):
        yield


def kaiming_a(rank: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT/nn.Linear default init for LoRA's A: Kaiming-uniform with a = √5 (bound = 1/√n)."""
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(rank, n, generator=generator) * 2 - 1) * bound


def layer_generator(config: AdapterConfig, name: str) -> torch.Generator:
    """A per-layer seeded generator so LoRA inits are reproducible and independent of apply order."""
    import zlib

    return torch.Generator().manual_seed((int(config.seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))

"""Rank-shaping callbacks: TRP and Cuttlefish (docs/methods.md §5).

Both are Hugging Face ``TrainerCallback``s: ``Trainer(..., callbacks=[TRP(...)])``
(the Trainer passes ``model`` and ``optimizer``; ``rankwise train`` runs them in
:func:`rankwise.training.train`). For tests and custom code they can also be
driven by hand: ``cb.on_step_end(model, step, optimizer=opt)`` after each
``optimizer.step()`` (``step`` = number of steps done, from 1) and
``cb.on_train_end(model)`` at the end.

Both are ``ExportableState``: a Trainer checkpoint records their history and
events in ``trainer_state.json``; resuming with :class:`rankwise.training.RankwiseTrainer`
(what :func:`rankwise.training.train` uses) restores them and replays Cuttlefish's
switches into the model and optimizer before the checkpoint's weights and
optimizer state are loaded, so a resumed run continues exactly.

**TRP** (trained rank pruning): every ``penalty_every`` steps each target W takes
a nuclear-norm step of size λ·penalty_every, W ← U max(Σ − λ', 0) Vᵀ, which is
the sub-gradient step W − λ' U Vᵀ for every σᵢ ≥ λ' (clamped at 0: the
proximal step, so no singular value changes sign); every ``every`` steps W is
replaced by its energy-truncated SVD (rank r_τ); at the end each matrix whose
r_τ is below break-even is factorised into a :class:`LowRankLinear`.

**Cuttlefish**: every ``check_every`` steps record each dense target's stable
rank ‖W‖_F²/‖W‖₂²; once it has changed by less than ``tol`` (relative) over
``patience`` consecutive checks, switch the matrix to B A with
k = ⌈stable rank⌉ (if k is below break-even; otherwise it stays dense for good).
Switched layers are swapped into the optimizer (old weight out, A and B in, in a
plain AdamW group). Every switch is logged and kept in ``events``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from rankwise.engine.metrics import break_even_rank, energy_rank, stable_rank
from rankwise.engine.svd import spectra, thin_svd
from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.modules import get_module, set_module
from rankwise.surgery.targets import Target, find_targets, is_matrix_module

log = logging.getLogger("rankwise.train")


def _targets_of(model: nn.Module, who: str, pattern: str | None, exclude: str | None) -> list[Target]:
    try:
        return find_targets(model, pattern, exclude)
    except RankwiseError as exc:
        if any(isinstance(m, LowRankLinear) for m in model.modules()):
            return []  # every target was already factorised
        if not any(is_matrix_module(m) for m in model.modules()):
            raise RankwiseError(
                f"{who} needs a model with target matrices (nn.Linear or Conv1D layers), but "
                f"{type(model).__name__} has none; pass a model with linear layers."
            ) from exc
        raise RankwiseError(f"{who}: {exc}") from exc


def replace_in_optimizer(
    optimizer: torch.optim.Optimizer | None, old: list[nn.Parameter], new: list[nn.Parameter]
) -> None:
    """Drop ``old`` parameters (and their state) from ``optimizer`` and add ``new`` ones.

    The new parameters go to the group that held the first old one when it is a
    plain group, else to a plain group (one without ``rank``), created with the
    old group's hyper-parameters if none exists: factors are small matrices that
    a rank-r projection would not fit.
    """
    if optimizer is None:
        return
    old_ids = {id(p) for p in old}
    home: dict[str, Any] | None = None
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in old_ids]
        if len(kept) != len(group["params"]) and home is None:
            home = group
        group["params"] = kept
    for p in old:
        optimizer.state.pop(p, None)
    if home is None or "rank" in home:
        plain = next((g for g in optimizer.param_groups if "rank" not in g), None)
        if plain is None:
            base = dict(home or optimizer.defaults)
            for key in ("params", "rank", "update_proj_gap", "scale", "proj_type"):
                base.pop(key, None)
            optimizer.add_param_group({**base, "params": list(new)})
            return
        home = plain
    home["params"].extend(new)


def _unwrap_ddp(model: nn.Module, who: str) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (checked to tolerate unused parameters)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return model
    if not model.find_unused_parameters:
        raise RankwiseError(
            f"{who} replaces weights by factors during training, which DDP then sees as unused parameters; wrap the "
            "model with DistributedDataParallel(model, find_unused_parameters=True) (Trainer: "
            "ddp_find_unused_parameters=True)."
        )
    return model.module


def sync_new_parameters(params: list[nn.Parameter]) -> None:
    """Make parameters created during a data-parallel run (a switched layer's factors) train in sync.

    DDP registers its parameters once, when it wraps the model, so factors created later never join its
    gradient all-reduce and every process would train its own copy. Here they are broadcast from
    process 0 (every process built the same factors from identical weights; this makes it exact) and
    each gets a hook that averages its gradient over the processes once backward has accumulated it.
    No-op without an initialised process group of more than one process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()

    def average(param: torch.Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world)

    for p in params:
        dist.broadcast(p.data, src=0)
        p.register_post_accumulate_grad_hook(average)


def _mark(model: nn.Module) -> None:
    """Once layers are factorised, the model carries rankwise's quantization_config, so save_pretrained /
    Trainer checkpoints write folders that from_pretrained rebuilds (docs/checkpoint.md)."""
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        from rankwise.io.checkpoint import mark_factorised

        mark_factorised(model)


class _RankCallback(TrainerCallback, ExportableState):
    """Plain-loop / Hugging Face dual interface shared by TRP and Cuttlefish."""

    name = "callback"
    replaces_parameters = False  # True: swaps layers mid-run (DDP must tolerate unused parameters)

    def __init__(self, targets: str | None = None, exclude: str | None = None) -> None:
        self.targets = targets
        self.exclude = exclude
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.events: list[dict[str, Any]] = []
        self._args: dict[str, Any] = {"targets": targets, "exclude": exclude}

    # Trainer checkpoints ------------------------------------------------------------------------
    _STATE = ("history", "events")

    def state(self) -> dict[str, Any]:
        """JSON-able ``{"args", "attributes"}`` (transformers' ``ExportableState``) stored in trainer_state.json."""
        attrs = {}
        for key in self._STATE:
            value = getattr(self, key)
            attrs[key] = sorted(value) if isinstance(value, set) else value
        return {"args": dict(self._args), "attributes": attrs}

    def load_state(self, attributes: dict[str, Any]) -> None:
        """Restore what :meth:`state` stored (history as (step, value) pairs, sets as sets)."""
        for key in self._STATE:
            if key not in attributes:
                continue
            value = attributes[key]
            if key == "history":
                value = {k: [tuple(x) for x in v] for k, v in value.items()}
            elif isinstance(getattr(self, key), set):
                value = set(value)
            setattr(self, key, value)

    def rebuild(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Replay structural changes recorded in ``events`` into ``model`` and ``optimizer``; returns how many."""
        return 0

    def check_model(self, model: nn.Module) -> list[Target]:
        """The target matrices of ``model``; one-line RankwiseError when it has none."""
        return _targets_of(model, self.name, self.targets, self.exclude)

    # dual-signature entry points -------------------------------------------------------------
    def on_train_begin(self, args: Any = None, state: Any = None, control: Any = None, **kwargs: Any) -> None:
        model = args if isinstance(args, nn.Module) else kwargs.get("model")
        if model is not None:
            self.check_model(model)

    def on_step_end(self, args: Any = None, state: Any = None, control: Any = None, **kwargs: Any) -> None:
        if isinstance(args, nn.Module):  # plain loop: on_step_end(model, step, optimizer=...)
            self.step_end(args, int(state), kwargs.get("optimizer", control))
            _mark(args)
            return None
        model = kwargs.get("model")
        if model is not None:
            self.step_end(model, int(state.global_step), kwargs.get("optimizer"))
            _mark(model)
        return None

    def on_train_end(self, args: Any = None, state: Any = None, control: Any = None, **kwargs: Any) -> None:
        model = args if isinstance(args, nn.Module) else kwargs.get("model")
        if model is not None:
            self.train_end(model)
            _mark(model)
        return None

    # implemented by subclasses --------------------------------------------------------------
    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        raise NotImplementedError

    def train_end(self, model: nn.Module) -> None:
        """Nothing by default."""

    def summary(self) -> dict[str, Any]:
        """JSON-able record of what the callback did."""
        return {"callback": self.name, "events": self.events}


class TRP(_RankCallback):
    """Trained rank pruning: nuclear-norm steps, periodic energy truncation, factorisation at the end."""

    name = "TRP"

    def __init__(
        self,
        lam: float = 1e-4,
        every: int = 100,
        energy: float = 0.99,
        penalty_every: int = 1,
        factorize_at_end: bool = True,
        targets: str | None = None,
        exclude: str | None = None,
    ) -> None:
        super().__init__(targets, exclude)
        self._args.update(lam=lam, every=every, energy=energy, penalty_every=penalty_every,
                          factorize_at_end=factorize_at_end)
        if lam < 0:
            raise RankwiseError(f"TRP's nuclear-norm weight lam must be >= 0, got {lam}.")
        if int(every) <= 0 or int(penalty_every) <= 0:
            raise RankwiseError(f"TRP's every/penalty_every must be positive step counts, got {every}/{penalty_every}.")
        if not 0.0 < energy <= 1.0:
            raise RankwiseError(f"TRP's energy threshold must lie in (0, 1], got {energy}.")
        self.lam = float(lam)
        self.every = int(every)
        self.energy = float(energy)
        self.penalty_every = int(penalty_every)
        self.factorize_at_end = factorize_at_end
        self.ranks: dict[str, int] = {}

    _STATE = ("history", "events", "ranks")

    @torch.no_grad()
    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        shrink = self.lam > 0 and step % self.penalty_every == 0
        truncate = step % self.every == 0
        if not (shrink or truncate):
            return
        for t in self.check_model(model):
            if isinstance(t.module, LowRankLinear):
                continue
            w = t.weight()
            u, s, vh = thin_svd(w.float())
            if shrink:
                s = (s - self.lam * self.penalty_every).clamp_min(0.0)
            k = len(s)
            if truncate:
                k = max(1, energy_rank(s, self.energy))
                self.history.setdefault(t.name, []).append((step, k))
                if self.ranks.get(t.name) != k:
                    self.events.append({"step": step, "layer": t.name, "action": "truncate", "rank": k})
                self.ranks[t.name] = k
            t.set_weight((u[:, :k] * s[:k]) @ vh[:k])

    @torch.no_grad()
    def train_end(self, model: nn.Module) -> None:
        """Factorise every target whose energy rank is below break-even into a LowRankLinear."""
        if not self.factorize_at_end:
            return
        for t in self.check_model(model):
            if isinstance(t.module, LowRankLinear):
                continue
            w = t.weight().float()
            u, s, vh = thin_svd(w)
            k = max(1, energy_rank(s, self.energy))
            m, n = t.shape
            if k >= break_even_rank(m, n):
                self.events.append({"step": None, "layer": t.name, "action": "kept-dense", "rank": k})
                continue
            root = s[:k].sqrt()
            layer = LowRankLinear.from_factors(
                u[:, :k] * root, root[:, None] * vh[:k], t.bias, "conv1d" if t.transposed else "linear",
                dtype=t.module.weight.dtype,
            )
            set_module(model, t.name, layer)
            self.ranks[t.name] = k
            self.events.append({"step": None, "layer": t.name, "action": "factorise", "rank": k})
            log.info("TRP: factorised %s at rank %d (break-even %d)", t.name, k, break_even_rank(m, n))


class Cuttlefish(_RankCallback):
    """Switch each matrix to B A at its stable rank once that rank has stopped moving."""

    name = "Cuttlefish"
    replaces_parameters = True
    _STATE = ("history", "events", "ranks", "done")

    def __init__(
        self,
        check_every: int = 10,
        tol: float = 0.02,
        patience: int = 2,
        warmup: int = 0,
        rank_scale: float = 1.0,
        targets: str | None = None,
        exclude: str | None = None,
    ) -> None:
        super().__init__(targets, exclude)
        self._args.update(check_every=check_every, tol=tol, patience=patience, warmup=warmup, rank_scale=rank_scale)
        if int(check_every) <= 0 or int(patience) <= 0:
            raise RankwiseError(f"Cuttlefish's check_every/patience must be positive, got {check_every}/{patience}.")
        if tol < 0 or rank_scale <= 0:
            raise RankwiseError(f"Cuttlefish's tol must be >= 0 and rank_scale > 0, got {tol}/{rank_scale}.")
        self.check_every = int(check_every)
        self.tol = float(tol)
        self.patience = int(patience)
        self.warmup = int(warmup)
        self.rank_scale = float(rank_scale)
        self.done = set()
        self.ranks: dict[str, int] = {}

    @property
    def done(self) -> set[str]:
        """Names of the matrices already decided (switched or kept dense)."""
        return self._done

    @done.setter
    def done(self, value: Any) -> None:  # a set; transformers' own callback restore passes the stored list
        self._done = set(value)

    def _settled(self, name: str) -> bool:
        h = [v for _, v in self.history.get(name, [])]
        if len(h) <= self.patience:
            return False
        recent = h[-(self.patience + 1) :]
        return all(abs(b - a) <= self.tol * max(abs(a), 1e-12) for a, b in zip(recent, recent[1:]))

    @torch.no_grad()
    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        if step % self.check_every != 0:
            return
        model = _unwrap_ddp(model, self.name)
        live = [
            t for t in self.check_model(model) if t.name not in self.done and not isinstance(t.module, LowRankLinear)
        ]
        if not live:
            return
        svals = spectra([t.weight() for t in live])
        for t, s in zip(live, svals):
            sr = stable_rank(s)
            self.history.setdefault(t.name, []).append((step, sr))
            if step < self.warmup or not self._settled(t.name):
                continue
            self.done.add(t.name)
            m, n = t.shape
            k = max(1, math.ceil(sr * self.rank_scale - 1e-9))
            if k >= break_even_rank(m, n):
                self.events.append({"step": step, "layer": t.name, "action": "kept-dense", "rank": k,
                                    "stable_rank": sr})
                log.info("Cuttlefish: %s stays dense (stable rank %.1f >= break-even)", t.name, sr)
                continue
            self._switch(model, t.name, k, optimizer)
            self.ranks[t.name] = k
            self.events.append({"step": step, "layer": t.name, "action": "factorise", "rank": k, "stable_rank": sr})
            log.info("Cuttlefish: step %d switched %s to rank %d (stable rank %.2f)", step, t.name, k, sr)

    @staticmethod
    def _switch(model: nn.Module, name: str, k: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Replace the dense matrix ``name`` by its rank-``k`` factors, in the model and in the optimizer.

        A layer that is already a LowRankLinear (a model rebuilt from a checkpoint) only has its parameters
        moved in the optimizer, exactly as the original switch moved them.
        """
        module = get_module(model, name)
        if isinstance(module, LowRankLinear):
            layer = module
            old_params = list(layer.parameters())
        else:
            bias = getattr(module, "bias", None)
            old_params = [module.weight] + ([bias] if bias is not None else [])
            layer = LowRankLinear.from_linear(module, k)
            set_module(model, name, layer)
        new_params = [layer.A.weight, layer.B.weight] + ([layer.bias] if layer.bias is not None else [])
        replace_in_optimizer(optimizer, old_params, new_params)
        sync_new_parameters(new_params)  # under DDP: the factors join the gradient averaging

    @torch.no_grad()
    def rebuild(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
        """Replay the recorded switches, in their order (the checkpoint's weights are loaded afterwards)."""
        model = _unwrap_ddp(model, self.name)
        n = 0
        for e in self.events:
            if e.get("action") == "factorise" and e.get("step") is not None:
                self._switch(model, e["layer"], int(e["rank"]), optimizer)
                n += 1
        if n:
            _mark(model)
        return n

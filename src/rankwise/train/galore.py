"""``GaLoreAdamW``: AdamW with low-rank gradient projection (GaLore), SVD-free DCT projection and Fira.

A drop-in replacement for ``galore_torch.GaLoreAdamW``: the same parameter
groups (``{"params": [...], "rank": 128, "update_proj_gap": 200, "scale": 0.25,
"proj_type": "std"}``), plus per-group (or default) options

* ``projection``: ``"svd"`` (exact, GaLore), ``"randomized"`` (seeded range
  finder) or ``"dct"`` (fixed DCT basis, top-r columns by gradient score);
* ``fira``: also apply the out-of-subspace gradient G − Q Qᵀ G (Fira), scaled
  per column by ‖Adam(R)‖/‖R‖, with a norm-growth limiter (the scaled residual's
  norm may grow by at most ``fira_limit`` per step).

For a matrix parameter in a group with ``rank`` (docs/methods.md §5)::

    every update_proj_gap steps:  Q ← projection of the current gradient G
    R = QᵀG (or G Q);  M, V ← Adam moments of R  (r×n or m×r)
    W ← W − lr·scale·(Q·Adam(R) [+ φ·(G − Q R)])

Everything else (vectors, embeddings, groups without ``rank``) gets exactly
``torch.optim.AdamW``'s update (same formula: decoupled weight decay applied
first, ε added after the bias-corrected square root). Defaults (lr 1e-3,
eps 1e-6, weight_decay 0) follow galore-torch. ``eps_style="galore"`` reproduces
galore-torch's arithmetic instead (m/(√v + ε) with a bias-corrected step size,
weight decay after the update): its effective ε is ε/√(1−β₂ᵗ), ~32× larger at
step 1, which matters when gradients are clipped small.

Under DDP the gradients are all-reduced before ``step()``, and every projection
is a deterministic function of the gradient and the step (the randomized sketch
is seeded per step), so all ranks keep identical projections and parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.train.projector import (
    PROJ_TYPES,
    Projector,
    check_gap,
    check_projection,
    check_rank,
    dct_basis,
)
from rankwise.train.sharded import RowShard, canonical_signs, is_sharded, local, projected_step_sharded

DEFAULT_RANK = 128
DEFAULT_GAP = 200


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose matrix parameters in ``rank`` groups keep r×n (or m×r) Adam moments.

    ``refresh_seconds`` lists the wall time of every projection refresh
    (for benchmarks); it is not part of the saved state.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = True,
        *,
        projection: str = "svd",
        fira: bool = False,
        fira_limit: float = 1.01,
        oversample: int = 8,
        niter: int = 1,
        seed: int = 0,
        eps_style: str = "torch",
        canonical_signs: bool = False,
    ) -> None:
        if lr < 0.0:
            raise RankwiseError(f"learning rate must be >= 0, got {lr}.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise RankwiseError(f"betas must lie in [0, 1), got {betas}.")
        if eps < 0.0:
            raise RankwiseError(f"eps must be >= 0, got {eps}.")
        if fira_limit < 1.0:
            raise RankwiseError(f"fira_limit must be >= 1 (the allowed growth per step), got {fira_limit}.")
        check_projection(projection)
        if eps_style not in ("torch", "galore"):
            raise RankwiseError(f"eps_style must be 'torch' or 'galore', got {eps_style!r}.")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "projection": projection,
            "fira": fira,
            "fira_limit": fira_limit,
            "oversample": oversample,
            "niter": niter,
            "seed": seed,
            "eps_style": eps_style,
            "canonical_signs": canonical_signs,
        }
        self.refresh_seconds: list[float] = []
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating its low-rank settings (one-line RankwiseError on bad values)."""
        if "rank" in param_group:
            param_group["rank"] = check_rank(param_group["rank"])
            param_group["update_proj_gap"] = check_gap(param_group.get("update_proj_gap", DEFAULT_GAP))
            param_group.setdefault("scale", 1.0)
            param_group.setdefault("proj_type", "std")
            if param_group["proj_type"] not in PROJ_TYPES:
                raise RankwiseError(
                    f"unknown proj_type {param_group['proj_type']!r}; use one of: {', '.join(PROJ_TYPES)}."
                )
        if "projection" in param_group:
            check_projection(param_group["projection"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            for p in group["params"]:
                if p.dim() == 2:
                    check_rank(group["rank"], tuple(p.shape), name=f"a parameter of shape {tuple(p.shape)}")

    def _projector(self, p: torch.Tensor, group: dict[str, Any]) -> Projector:
        return Projector(
            tuple(p.shape),
            group["rank"],
            projection=group["projection"],
            proj_type=group["proj_type"],
            oversample=group["oversample"],
            niter=group["niter"],
            seed=group["seed"],
        )

    def is_projected(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        """True when ``p`` gets the low-rank update (a matrix in a group with ``rank``)."""
        return "rank" in group and p.dim() == 2

    def shared_state_tensors(self) -> list[torch.Tensor]:
        """Tensors shared by many parameters' states (the DCT bases in use), for memory accounting."""
        out: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}
        for group in self.param_groups:
            if group.get("projection") != "dct" or "rank" not in group:
                continue
            for p in group["params"]:
                if p.dim() == 2 and "proj_indices" in self.state.get(p, {}):
                    proj = self._projector(p, group)
                    key = (proj.dim, str(p.device), p.dtype)
                    out[key] = dct_basis(proj.dim, p.device, p.dtype)
        return list(out.values())

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimisation step (see the module docstring for the update).

        Parameters that are DTensors sharded by rows (FSDP2's ``fully_shard``) are updated from their
        local shards (:mod:`rankwise.train.sharded`): no process gathers a whole gradient except for a
        left-side projection refresh.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RankwiseError("GaLoreAdamW does not support sparse gradients; use dense embeddings.")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                projected = self.is_projected(p, group)
                if is_sharded(p):
                    p_local, g_local = local(p), local(g)
                    if projected:
                        projected_step_sharded(self, p_local, g_local, self._projector(p, group), state, group,
                                               RowShard.of(p))
                        continue
                    p, g = p_local, g_local
                if projected:
                    proj = self._projector(p, group)
                    has = "proj_basis" in state or "proj_indices" in state
                    if not has or state["step"] % group["update_proj_gap"] == 0:
                        self.refresh_seconds.append(proj.refresh(g, state, state["step"]))
                        if group.get("canonical_signs") and "proj_basis" in state:
                            state["proj_basis"] = canonical_signs(state["proj_basis"])
                    q = proj.basis(state, g)
                    r = proj.project(g, q)
                else:
                    r = g
                n = self._adam_moments(p, r, state, group)
                if not projected:
                    continue
                update = proj.project_back(n, q)
                if group["fira"]:
                    update.add_(self._fira_residual(g, r, n, q, proj, state, group["fira_limit"]))
                p.add_(update, alpha=-lr * group["scale"])
                if group["weight_decay"] != 0.0 and group.get("eps_style", "torch") == "galore":
                    p.add_(p, alpha=-lr * group["weight_decay"])
        return loss

    def _adam_moments(self, p: torch.Tensor, r: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        """Advance the Adam moments of ``r`` and apply decoupled weight decay (torch style) to ``p``.

        For a plain parameter (``r`` is its gradient) the AdamW update is applied here and None returned;
        for a projected one the normalised, bias-corrected direction N (the shape of ``r``) is returned.
        """
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        wd = group["weight_decay"]
        projected = self.is_projected(p, group)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(r, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(r, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if exp_avg.shape != r.shape:
            raise RankwiseError(
                f"optimizer state holds moments of shape {tuple(exp_avg.shape)} but the projected "
                f"gradient has shape {tuple(r.shape)}; the state was saved with another rank or model."
            )
        state["step"] += 1
        t = state["step"]
        galore_eps = group.get("eps_style", "torch") == "galore"
        if wd != 0.0 and not galore_eps:
            p.mul_(1.0 - lr * wd)
        exp_avg.lerp_(r, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
        if group["correct_bias"]:
            bc1 = 1.0 - beta1**t
            bc2_sqrt = math.sqrt(1.0 - beta2**t)
        else:
            bc1, bc2_sqrt = 1.0, 1.0
        if galore_eps:  # galore-torch / old transformers AdamW: m/(√v + ε) times √(1−β₂ᵗ)/(1−β₁ᵗ)
            denom = exp_avg_sq.sqrt().add_(eps)
            step_factor = bc2_sqrt / bc1
        else:  # torch.optim.AdamW: m̂/(√v̂ + ε)
            denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
            step_factor = 1.0 / bc1
        if not projected:
            p.addcdiv_(exp_avg, denom, value=-lr * step_factor)
            if wd != 0.0 and galore_eps:
                p.add_(p, alpha=-lr * wd)
            return None
        n = exp_avg / denom
        if step_factor != 1.0:
            n.mul_(step_factor)
        return n

    @staticmethod
    def _fira_residual(
        g: torch.Tensor,
        r: torch.Tensor,
        n: torch.Tensor,
        q: torch.Tensor,
        proj: Projector,
        state: dict,
        limit: float,
    ) -> torch.Tensor:
        """φ·(G − Q R) with φ = ‖Adam(R)‖/‖R‖ per column (left) or row (right), norm growth ≤ ``limit``×."""
        resid = g - proj.project_back(r, q)
        dim = 0 if proj.side == "left" else 1  # norms over the projected (rank) dimension
        phi = torch.linalg.vector_norm(n, dim=dim, keepdim=True) / (
            torch.linalg.vector_norm(r, dim=dim, keepdim=True) + 1e-8
        )
        resid.mul_(phi)
        norm = torch.linalg.vector_norm(resid)
        prev = state.get("fira_norm")
        if prev is not None and float(norm) > limit * float(prev) > 0.0:
            resid.mul_(limit * float(prev) / float(norm))
            norm = norm.new_tensor(limit * float(prev))
        state["fira_norm"] = norm.detach().clone()
        return resid

    # ------------------------------------------------------------ state dicts
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a saved state; refuses (one-line RankwiseError) one saved with another rank or projection."""
        saved = state_dict.get("param_groups")
        if not isinstance(saved, list) or len(saved) != len(self.param_groups):
            got = len(saved) if isinstance(saved, list) else "no"
            raise RankwiseError(
                f"optimizer state has {got} parameter groups but this optimizer has {len(self.param_groups)}; "
                "build the optimizer with the same groups it was saved with."
            )
        for i, (cur, old) in enumerate(zip(self.param_groups, saved)):
            if cur.get("rank") != old.get("rank"):
                raise RankwiseError(
                    f"optimizer state was saved with rank {old.get('rank')} in group {i}, but this optimizer uses "
                    f"rank {cur.get('rank')}; resume with --rank {old.get('rank')} or start a fresh optimizer."
                )
            if "rank" in cur and cur.get("projection") != old.get("projection"):
                raise RankwiseError(
                    f"optimizer state was saved with projection {old.get('projection')!r} in group {i}, but this "
                    f"optimizer uses {cur.get('projection')!r}; resume with the same projection."
                )
            if len(cur["params"]) != len(old.get("params", [])):
                raise RankwiseError(
                    f"optimizer state group {i} has {len(old.get('params', []))} parameters, this optimizer "
                    f"{len(cur['params'])}; it was saved for another model."
                )
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch casts every state tensor to the parameter's dtype
            if "proj_indices" in st:
                st["proj_indices"] = st["proj_indices"].round().to(torch.long)


def galore_param_groups(
    model: nn.Module,
    rank: int = DEFAULT_RANK,
    update_proj_gap: int = DEFAULT_GAP,
    scale: float = 0.25,
    proj_type: str = "std",
    projection: str | None = None,
    fira: bool | None = None,
    targets: str | None = None,
    exclude: str | None = None,
) -> list[dict[str, Any]]:
    """Two parameter groups for a Hugging Face model: low-rank matrices and everything else.

    The low-rank group holds the weights of the attention and MLP matrices
    (:func:`rankwise.surgery.find_targets`, which leaves out the LM head and
    anything tied to the embeddings; ``targets``/``exclude`` are regexes over
    module names); embeddings, norms, biases and the head go to the plain AdamW
    group. ``projection``/``fira`` set those options for the low-rank group only.
    """
    from rankwise.surgery.targets import find_targets

    rank = check_rank(rank)
    update_proj_gap = check_gap(update_proj_gap)
    if projection is not None:
        check_projection(projection)
    if any(is_sharded(p) for p in model.parameters()):
        found = _sharded_targets(model, targets, exclude)
    else:
        found = find_targets(model, targets, exclude)
    lowrank: list[nn.Parameter] = []
    seen: set[int] = set()
    for t in found:
        w = t.module.weight
        if not w.requires_grad or id(w) in seen:
            continue
        check_rank(rank, t.shape, name=t.name)
        lowrank.append(w)
        seen.add(id(w))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    group: dict[str, Any] = {
        "params": lowrank,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
    }
    if projection is not None:
        group["projection"] = projection
    if fira is not None:
        group["fira"] = bool(fira)
    groups = [group]
    if rest:
        groups.insert(0, {"params": rest})
    return groups


def _sharded_targets(model: nn.Module, targets: str | None, exclude: str | None) -> list:
    """``find_targets`` for a model whose parameters are DTensors (FSDP2).

    ``find_targets`` recognises tied weights by their data pointer, which a DTensor does not have
    (every one reads 0); here the LM head and matrices tied to the input embeddings are left out by
    parameter identity (Hugging Face ties by sharing the Parameter object).
    """
    from rankwise.surgery.targets import find_targets

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(emb.weight)} if emb is not None and getattr(emb, "weight", None) is not None else set()
    found = [
        t for t in find_targets(model, targets, exclude, include_heads=True)
        if t.module is not head and id(t.module.weight) not in tied
    ]
    if not found:
        raise RankwiseError("no target matrices are left once the LM head and tied embeddings are excluded.")
    return found


class GaLoreFactory:
    """Builds a :class:`GaLoreAdamW` for a model: the Hugging Face Trainer's optimizer-factory hook.

    ``TrainingArguments(optim=...)`` accepts only the names of transformers' own ``OptimizerNames``
    enum (its handler table is private), so a rankwise optimizer cannot be *named* there. The public
    routes are ``Trainer(optimizers=(GaLoreAdamW(...), None))`` and, to let the Trainer build it
    (after accelerate has wrapped or sharded the model)::

        Trainer(..., optimizer_cls_and_kwargs=(GaLoreFactory, {"rank": 128, "lr": 1e-3}))

    The Trainer instantiates the factory and calls it with the model and the kwargs: the
    :func:`galore_param_groups` options (``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
    ``projection``, ``fira``, ``targets``, ``exclude``) build the groups, the rest go to
    :class:`GaLoreAdamW`.
    """

    GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projection", "fira", "targets", "exclude")

    def __call__(self, model: nn.Module, **kwargs: Any) -> GaLoreAdamW:
        group_kw = {k: kwargs.pop(k) for k in self.GROUP_KEYS if k in kwargs}
        return GaLoreAdamW(galore_param_groups(model, **group_kw), **kwargs)

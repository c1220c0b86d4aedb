"""GaLore on row-sharded parameters (FSDP2's ``fully_shard``): no process ever holds the whole gradient.

Under ``torch.distributed.fsdp.fully_shard`` a matrix parameter W (m×n) is a DTensor sharded by
rows: process i holds W_i and, after backward, its gradient rows G_i (the reduce-scattered mean of
every process's gradient). GaLore's update needs a projection of G and Adam moments of the
projected gradient; here both are computed from the shards:

* **right side** (m > n under ``proj_type="std"``: Q is n×r, R = G Q is m×r). The projection
  comes from the all-reduced Gram matrix of the smaller side, GᵀG = Σ_i G_iᵀG_i (n×n, float64):
  ``svd`` takes its top-r eigenvectors (the top right singular vectors of G); ``dct`` scores
  column k of the DCT basis D by ‖G D e_k‖² = Σ_i ‖G_i D e_k‖²; ``randomized`` runs the range
  finder on the sharded matrix (sums of n×q and q×q products, the same seeded sketch as one
  process). R_i = G_i Q are the local rows of R, so the Adam moments (m_i×r) are sharded with the
  parameter and the update N_i Qᵀ touches only local rows. Q itself is kept sharded too: every
  process computes the same Q at a refresh but keeps only its chunk of Q's n rows (n/N×r), and
  each step all-gathers the n×r matrix transiently (as FSDP all-gathers a parameter for its
  forward), so no process holds a whole basis between steps.
* **left side** (m < n: Q is m×r, R = QᵀG is r×n). Q's rows are sharded like W's (Q_i); R =
  Σ_i Q_iᵀG_i is all-reduced (r×n); the Adam moments are kept for this process's *columns* of R
  only (r×n/N) and the normalised update is all-gathered (r×n) before Q_i·N updates the local rows.
  The projection itself needs the singular vectors of the smaller side, whose Gram matrix G Gᵀ
  is not a sum of per-process products for row shards; at a refresh (every ``update_proj_gap``
  steps) the gradient is gathered once, transiently, and projected exactly as in one process.

Signs of singular vectors are arbitrary (LAPACK's SVD and an eigensolver pick different ones) and
the Adam moments outlive a refresh, so under FSDP every basis is sign-canonicalised (each column's
largest entry positive); pass ``canonical_signs=True`` to a DDP/one-process optimizer to get the
same trajectory. torch has no primitive for any of this (FSDP2 hands optimizers plain sharded
DTensors), so it is written here with the process group's collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from rankwise.engine.linalg import orthonormal_basis, sym_eigh
from rankwise.errors import RankwiseError
from rankwise.train.projector import Projector, dct_basis, dct_scores


def is_sharded(p: torch.Tensor) -> bool:
    """True for a DTensor parameter (FSDP2 / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(p, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def canonical_signs(q: torch.Tensor) -> torch.Tensor:
    """``q`` with each column's sign flipped so that its largest-magnitude entry is positive."""
    idx = q.abs().argmax(dim=0)
    s = torch.sign(q.gather(0, idx[None, :]))
    s[s == 0] = 1
    return q * s


@dataclass
class RowShard:
    """Where this process's rows of an m×n DTensor sharded on dim 0 lie, and its process group."""

    group: object
    world: int
    rank: int
    m: int
    n: int
    sizes: list[int]

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def rows(self) -> int:
        return self.sizes[self.rank]

    @classmethod
    def of(cls, p: torch.Tensor) -> RowShard:
        from torch.distributed.tensor import Shard

        placements = tuple(p.placements)
        mesh = p.device_mesh
        if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
            raise RankwiseError(
                f"GaLoreAdamW under FSDP supports parameters sharded by rows on a 1-D mesh (fully_shard's default), "
                f"got placements {placements} on a {mesh.ndim}-D mesh."
            )
        group = mesh.get_group()
        world, rank = tdist.get_world_size(group), tdist.get_rank(group)
        m, n = int(p.shape[0]), int(p.shape[1])
        chunks = torch.arange(m).chunk(world)  # torch.chunk's split, as FSDP2 shards
        sizes = [len(c) for c in chunks] + [0] * (world - len(chunks))
        return cls(group=group, world=world, rank=rank, m=m, n=n, sizes=sizes)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        tdist.all_reduce(t, group=self.group)
        return t

    def chunk_sizes(self, n: int) -> list[int]:
        """How torch.chunk (FSDP2's split) divides ``n`` rows or columns over the processes."""
        sizes = [len(c) for c in torch.arange(n).chunk(self.world)]
        return sizes + [0] * (self.world - len(sizes))

    def gather_rows(self, t: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """The full matrix from every process's chunk of its ``n`` rows (default: the parameter's m).

        Chunks are padded to equal sizes for gloo's all_gather, then trimmed.
        """
        sizes = self.sizes if n is None else self.chunk_sizes(n)
        width = max(sizes)
        pad = t.new_zeros(width, *t.shape[1:])
        pad[: t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        tdist.all_gather(parts, pad, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def col_range(self, n: int) -> tuple[int, int]:
        """This process's slice of ``n`` columns (torch.chunk's split)."""
        sizes = self.chunk_sizes(n)
        start = sum(sizes[: self.rank])
        return start, start + sizes[self.rank]

    def gather_cols(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The full r×n matrix from every process's column slice."""
        sizes = self.chunk_sizes(n)
        width = max(sizes)
        pad = t.new_zeros(t.shape[0], width)
        pad[:, : t.shape[1]] = t
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        tdist.all_gather(parts, pad.contiguous(), group=self.group)
        return torch.cat([p[:, :s] for p, s in zip(parts, sizes)], dim=1)


# -- refresh of the projection from the shards -----------------------------------------------------------


def refresh_sharded(proj: Projector, g: torch.Tensor, state: dict, step: int, shard: RowShard) -> None:
    """New projection of the m×n gradient whose local rows are ``g``, written into ``state``.

    ``proj_indices`` (DCT, r indices, the same on every process) or ``proj_basis``: this process's
    chunk of Q's rows, m_i×r (left side: the rows of W it holds) or n_i×r (right side: its share of
    the n rows, :meth:`RowShard.col_range`). Every chunk is a copy, so the whole Q computed at the
    refresh is freed (a slice would keep the full storage alive).
    """
    work = g if g.dtype in (torch.float32, torch.float64) else g.float()
    if proj.side == "left":
        full = shard.gather_rows(work)  # transient: only at a refresh (see the module docstring)
        tmp: dict = {}
        proj.refresh(full, tmp, step)
        if "proj_basis" in tmp:
            q = canonical_signs(tmp["proj_basis"].to(work.dtype))
            state["proj_basis"] = q[shard.start : shard.start + shard.rows].to(g.dtype, copy=True)
        else:
            state["proj_indices"] = tmp["proj_indices"]
        state.pop("proj_rows", None)
        return
    r = proj.rank
    if proj.projection == "svd":
        g64 = work.to(torch.float64)
        gram = shard.all_reduce(g64.T @ g64)
        _, vecs = sym_eigh(gram)
        q = canonical_signs(vecs[:, -r:].flip(1))
    elif proj.projection == "dct":
        d = dct_basis(proj.dim, work.device, work.dtype)
        sq = shard.all_reduce((work @ d).pow(2).sum(0).to(torch.float64))
        state["proj_indices"] = torch.topk(sq, r, sorted=True).indices.to(torch.long)
        return
    else:
        q = _randomized_right(work, r, proj, step, shard)
    c0, c1 = shard.col_range(shard.n)
    state["proj_basis"] = q[c0:c1].to(g.dtype, copy=True)  # this process's chunk of Q's n rows


def _randomized_right(g: torch.Tensor, rank: int, proj: Projector, step: int, shard: RowShard) -> torch.Tensor:
    """The one-process range finder of ``projector._randomized_range`` (side right) on row shards.

    a = Gᵀ (n×m); the sketch Ω (m×q) is the same seeded matrix as in one process, each process
    using its rows; every product of a with something is a sum over processes.
    """
    n, m = shard.n, shard.m
    q = min(n, m, rank + max(0, proj.oversample))
    gen = torch.Generator().manual_seed(proj.seed * 1_000_003 + int(step))
    omega = torch.randn(m, q, generator=gen, dtype=g.dtype, device="cpu").to(g.device)
    omega_i = omega[shard.start : shard.start + shard.rows]
    y = shard.all_reduce(g.T @ omega_i)  # a Ω = Σ G_iᵀ Ω_i
    for _ in range(proj.niter):
        y = orthonormal_basis(y)
        y = shard.all_reduce(g.T @ (g @ y))  # a aᵀ y = Σ G_iᵀ (G_i y)
    basis = orthonormal_basis(y)
    # left singular vectors of basisᵀ a (q×m) = eigenvectors of its Gram Σ (G_i basis)ᵀ(G_i basis)
    gb = (g @ basis).to(torch.float64)
    small_gram = shard.all_reduce(gb.T @ gb)
    _, vecs = sym_eigh(small_gram)
    ub = vecs[:, -rank:].flip(1).to(g.dtype)
    return canonical_signs(basis @ ub).contiguous()


def basis_sharded(proj: Projector, state: dict, like: torch.Tensor, shard: RowShard) -> torch.Tensor:
    """Q for this process: n×r (right side; all-gathered from the chunks, transient) or its rows m_i×r (left)."""
    if proj.projection == "dct":
        d = dct_basis(proj.dim, like.device, like.dtype)
        q = d.index_select(1, state["proj_indices"].to(like.device))
        if proj.side == "left":
            q = q[shard.start : shard.start + shard.rows]
        return q
    q = state["proj_basis"]
    q = q if q.dtype == like.dtype else q.to(like.dtype)
    return shard.gather_rows(q, shard.n) if proj.side == "right" else q


# -- the Adam step on the shards ---------------------------------------------------------------------------


def projected_step_sharded(
    opt, p_local: torch.Tensor, g: torch.Tensor, proj: Projector, state: dict, group: dict, shard: RowShard
) -> None:
    """GaLoreAdamW's projected update of one row-sharded matrix (see the module docstring)."""
    if "step" not in state:
        state["step"] = 0
    has = "proj_basis" in state or "proj_indices" in state
    if not has or state["step"] % group["update_proj_gap"] == 0:
        import time

        t0 = time.perf_counter()
        refresh_sharded(proj, g, state, state["step"], shard)
        opt.refresh_seconds.append(time.perf_counter() - t0)
    q = basis_sharded(proj, state, g, shard)
    if proj.side == "right":
        r_full = g @ q  # local rows of R (m_i×r)
        r = r_full
    else:
        r_full = shard.all_reduce(q.T @ g)  # R = Σ Q_iᵀ G_i (r×n)
        c0, c1 = shard.col_range(shard.n)
        r = r_full[:, c0:c1]  # this process's columns: the moments it keeps
    n_mat = opt._adam_moments(p_local, r, state, group)
    if proj.side == "right":
        n_full = n_mat
        update = n_full @ q.T
    else:
        n_full = shard.gather_cols(n_mat, shard.n)
        update = q @ n_full
    if group["fira"]:
        update.add_(_fira_residual_sharded(g, r_full, n_full, q, proj, state, group["fira_limit"], shard))
    p_local.add_(update, alpha=-group["lr"] * group["scale"])
    if group["weight_decay"] != 0.0 and group.get("eps_style", "torch") == "galore":
        p_local.add_(p_local, alpha=-group["lr"] * group["weight_decay"])


def _fira_residual_sharded(g, r, n, q, proj: Projector, state: dict, limit: float, shard: RowShard) -> torch.Tensor:
    """Fira's scaled residual on this process's rows; the norm limiter uses the global norm."""
    resid = g - (q @ r if proj.side == "left" else r @ q.T)
    dim = 0 if proj.side == "left" else 1
    phi = torch.linalg.vector_norm(n, dim=dim, keepdim=True) / (torch.linalg.vector_norm(r, dim=dim, keepdim=True)
                                                                 + 1e-8)
    resid.mul_(phi)
    sq = resid.pow(2).sum().to(torch.float64).reshape(1)
    norm = math.sqrt(float(shard.all_reduce(sq)))
    prev = state.get("fira_norm")
    if prev is not None and norm > limit * float(prev) > 0.0:
        resid.mul_(limit * float(prev) / norm)
        norm = limit * float(prev)
    state["fira_norm"] = torch.tensor(norm, dtype=g.dtype)
    return resid


__all__ = ["RowShard", "canonical_signs", "dct_scores", "is_sharded", "local", "projected_step_sharded"]

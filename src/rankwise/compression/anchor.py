"""Output-anchored factors: B (and optionally A) solved against the *dense* layer's outputs.

A method (e.g. whitened truncation) picks the rank k and the input-side factor A (k×n). The
compressed model then feeds the layer inputs X_c (N×n, one row per token) that differ from the
inputs X_d the dense model feeds it at the same token positions (earlier blocks are compressed).
SVD-LLM V2 and AA-SVD anchor the layer to the dense outputs instead of its own:

    J(B, A) = ‖X_d Wᵀ − X_c Aᵀ Bᵀ‖²_F

With S_c = X_cᵀ X_c and the cross statistics C = X_dᵀ X_c (both n×n, float64):

* ∂J/∂B = 0  ⇒  B (A S_c Aᵀ) = W C Aᵀ,   so  B* = W C Aᵀ (A S_c Aᵀ)⁻¹          (m×k)
* ∂J/∂A = 0  ⇒  (BᵀB) A S_c = Bᵀ W C,     so  A* = (BᵀB)⁻¹ Bᵀ W C S_c⁻¹          (k×n)
* J = tr(W D Wᵀ) − 2 tr(B A Cᵀ Wᵀ) + tr(B A S_c Aᵀ Bᵀ) with D = X_dᵀ X_d.

Each update minimises J exactly over one factor, so alternating them (``anchor_iters``) never
raises J. When X_c = X_d (no sequential calibration) C = S_c = XᵀX, and for whitened truncation
(A = Σ_k V_kᵀ L⁻¹, L Lᵀ = XᵀX, W L = U Σ Vᵀ) B* = U_k: the update reproduces plain whitened
truncation, which is already the best rank-k choice for the layer's own output error.

The k×k and n×n systems are solved by least squares through :mod:`rankwise.engine.linalg`
(every LAPACK call lives in the engine) with a relative ridge ``jitter``·mean(diag) on the
Gram matrix, so a rank-deficient S_c (too few calibration tokens) still gives finite factors. The
A update inverts the n×n S_c, which few calibration tokens leave ill-conditioned: its ridge is at
least 1e-6 (the whitening jitter's default), so it is exact only up to that regularisation.

:class:`CrossCollector` accumulates C block by block: the runner runs each calibration batch
through the (still dense) block twice, on the dense teacher stream (:meth:`CrossCollector.dense`
records every target's input) and on the compressed stream (:meth:`CrossCollector.paired`
accumulates X_dᵀ X_c). Products are taken in the activations' precision (float32 or wider) in
row chunks and summed in float64 on the statistics device, like :class:`StatsCollector`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rankwise.engine.linalg import least_squares
from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Target


def _ridge(G: torch.Tensor, jitter: float) -> torch.Tensor:
    """G + jitter·mean(diag G)·I (symmetrised; a copy)."""
    G = 0.5 * (G + G.T)
    scale = float(G.diagonal().mean().abs().clamp_min(1e-30))
    if jitter > 0:
        G.diagonal().add_(jitter * scale)
    return G


def anchored_b(W: torch.Tensor, A: torch.Tensor, S_c: torch.Tensor, C: torch.Tensor,
               jitter: float = 1e-10) -> torch.Tensor:
    """B* = W C Aᵀ (A S_c Aᵀ)⁻¹ in float64 (m×k): the best B for a fixed A on the anchored objective."""
    W, A, S_c, C = (x.to(torch.float64) for x in (W, A, S_c, C))
    G = _ridge(A @ S_c @ A.T, jitter)  # k×k, symmetric positive (semi)definite
    R = A @ (C.T @ W.T)  # k×m = (W C Aᵀ)ᵀ
    return least_squares(G, R).T.contiguous()


def anchored_a(W: torch.Tensor, B: torch.Tensor, S_c: torch.Tensor, C: torch.Tensor,
               jitter: float = 1e-6) -> torch.Tensor:
    """A* = (BᵀB)⁻¹ Bᵀ W C S_c⁻¹ in float64 (k×n): the best A for a fixed B on the anchored objective."""
    W, B, S_c, C = (x.to(torch.float64) for x in (W, B, S_c, C))
    P = least_squares(_ridge(B.T @ B, jitter), B.T @ W)  # k×n = (BᵀB)⁻¹ Bᵀ W
    # A S_c = P C  ⇔  S_c Aᵀ = Cᵀ Pᵀ
    return least_squares(_ridge(S_c, jitter), C.T @ P.T).T.contiguous()


def anchor_factors(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, S_c: torch.Tensor,
                   C: torch.Tensor | None = None, iters: int = 0,
                   jitter: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) after the closed-form B update and ``iters`` alternating (A, B) updates, float64.

    ``C`` None means X_c = X_d (C = S_c). Every update minimises J over one factor exactly (up to
    the ridge), so J never rises from one update to the next.
    """
    C = S_c if C is None else C
    B = anchored_b(W, A, S_c, C, jitter)
    A = A.to(torch.float64)
    for _ in range(iters):
        A = anchored_a(W, B, S_c, C, max(jitter, 1e-6))
        B = anchored_b(W, A, S_c, C, jitter)
    return B, A


def anchor_objective(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, S_c: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor) -> float:
    """J(B, A) = ‖X_d Wᵀ − X_c Aᵀ Bᵀ‖²_F from the statistics (D = X_dᵀX_d, C = X_dᵀX_c, S_c = X_cᵀX_c)."""
    W, B, A, S_c, C, D = (x.to(torch.float64) for x in (W, B, A, S_c, C, D))
    M = B @ A
    return float(torch.trace(W @ D @ W.T) - 2 * torch.trace(M @ C.T @ W.T) + torch.trace(M @ S_c @ M.T))


class CrossCollector:
    """Cross statistics C = X_dᵀ X_c (float64, n×n) of each target, from paired dense/compressed passes.

    Per calibration batch: ``with col.dense(): block(h_dense)`` records each target's input,
    then ``with col.paired(): block(h_compressed)`` adds x_dᵀ x_c. Targets fed the same input
    tensor in both passes (q/k/v, gate/up) share one C (the same tensor object, summed once).
    ``skip_first`` drops the first positions of every window, as the statistics collector does.
    """

    def __init__(self, targets: list[Target], skip_first: int = 0, chunk_rows: int = 1024,
                 stats_device: torch.device | None = None) -> None:
        self.targets = targets
        self.skip_first = skip_first
        self.chunk_rows = chunk_rows
        self.stats_device = stats_device
        self.cross: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {t.name: 0 for t in targets}
        self.shares: dict[str, str] = {}  # name -> the target whose C it shares
        self._dense: dict[str, torch.Tensor] = {}
        self._pair_of: dict[str, tuple[int, int]] = {}  # this batch: name -> (id x_d, id x_c)
        self._owner_of_pair: dict[tuple[int, int], str] = {}
        self._batches = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.skip_first and x.dim() >= 3 and x.shape[-2] > self.skip_first:
            x = x[..., self.skip_first:, :]
        return x.reshape(-1, x.shape[-1])

    @contextlib.contextmanager
    def _hooks(self, hook_of) -> Iterator[None]:
        handles = [t.module.register_forward_hook(hook_of(t.name)) for t in self.targets]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def dense(self) -> contextlib.AbstractContextManager:
        """Record each target's input on the dense stream (one batch)."""
        self._dense.clear()

        def hook_of(name: str):
            def hook(module: nn.Module, args: tuple, output) -> None:
                if args and isinstance(args[0], torch.Tensor):
                    if name in self._dense:
                        raise RankwiseError(f"{name} ran twice in one block call; output anchoring supports each "
                                            "layer once per block forward.")
                    self._dense[name] = args[0]
            return hook

        return self._hooks(hook_of)

    def paired(self) -> contextlib.AbstractContextManager:
        """Add x_dᵀ x_c for each target on the compressed stream (the same batch as the last :meth:`dense`)."""
        self._pair_of.clear()
        first = self._batches == 0
        self._batches += 1

        def hook_of(name: str):
            def hook(module: nn.Module, args: tuple, output) -> None:
                if not (args and isinstance(args[0], torch.Tensor)):
                    return
                xd = self._dense.get(name)
                if xd is None:
                    raise RankwiseError(f"{name} ran on the compressed stream but not on the dense one; output "
                                        "anchoring needs the same block calls on both.")
                xc = args[0]
                if tuple(xd.shape) != tuple(xc.shape):
                    raise RuntimeError(f"rankwise bug: dense and compressed inputs of {name} differ in shape")
                key = (id(xd), id(xc))
                self._pair_of[name] = key
                owner = self._owner_of_pair.get(key) if first else None
                if first and owner is not None:
                    self.shares[name] = owner
                    self.cross[name] = self.cross[owner]
                if name in self.shares:
                    if self._pair_of.get(self.shares[name]) != key:
                        raise RankwiseError(f"{name} shared its inputs with {self.shares[name]} on the first "
                                            "calibration batch but not later; output anchoring cannot pair them.")
                    self.rows[name] += self._count(xc)
                    return
                if first:
                    self._owner_of_pair[key] = name
                self._accumulate(name, xd, xc)
            return hook

        return self._hooks(hook_of)

    def _count(self, x: torch.Tensor) -> int:
        return int(self._rows(x).shape[0])

    def _accumulate(self, name: str, xd: torch.Tensor, xc: torch.Tensor) -> None:
        d, c = self._rows(xd), self._rows(xc)
        dev = self.stats_device or c.device
        if name not in self.cross:
            self.cross[name] = torch.zeros(c.shape[1], c.shape[1], dtype=torch.float64, device=dev)
        acc = self.cross[name]
        dt = torch.float64 if c.dtype == torch.float64 else torch.float32
        for i in range(0, c.shape[0], self.chunk_rows):
            acc.add_((d[i:i + self.chunk_rows].to(dt).T @ c[i:i + self.chunk_rows].to(dt)).to(dev))
        self.rows[name] += int(c.shape[0])

    def unique(self) -> list[torch.Tensor]:
        """Each distinct C tensor once (what a distributed run all-reduces)."""
        seen: dict[int, torch.Tensor] = {}
        for name in sorted(self.cross):
            seen.setdefault(id(self.cross[name]), self.cross[name])
        return list(seen.values())

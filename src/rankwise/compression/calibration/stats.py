"""Per-layer input statistics collected by forward hooks, accumulated in float64.

For every targeted layer we keep, over all calibration tokens x (rows of X):

* ``xtx`` = Σ x xᵀ = XᵀX (n×n), the second moment whitening needs;
* ``abs_sum`` = Σ |x| (n), whose mean drives ASVD's column scaling;
* ``grad_sq`` = Σ_batches Σ_j G_ij² (m), the row sums of the squared weight gradients
  (an empirical Fisher diagonal summed over each output row: all FWSVD needs; only
  when requested, and only if the forward loop calls ``backward``).

Layers fed the very same input tensor (q/k/v, gate/up) share one XᵀX: the hook remembers
the last input object, and a layer that always sees its predecessor's input shares that
layer's sums (the same tensor; ``extra["shares"]`` names the owner) instead of computing and
storing the same n×n matrix again. Sums are accumulated in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Target


@dataclass
class LayerStats:
    """Accumulated statistics of one layer's inputs (float64)."""

    n: int
    xtx: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    rows: int = 0
    batches: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x_j| per input feature."""
        if self.abs_sum is None or self.rows == 0:
            raise ValueError("no activations were recorded for this layer")
        return self.abs_sum / self.rows

    def covariance(self) -> torch.Tensor:
        """XᵀX (float64)."""
        if self.xtx is None:
            raise ValueError("no activations were recorded for this layer")
        return self.xtx


class StatsCollector:
    """Forward hooks on target layers that accumulate :class:`LayerStats`.

    Use as a context manager; hooks are removed on exit. ``skip_first`` drops
    the first ``skip_first`` positions of every sequence (e.g. the BOS token,
    whose huge "attention-sink" activations can dominate XᵀX).
    """

    def __init__(
        self,
        targets: list[Target],
        want_xtx: bool = True,
        want_abs: bool = False,
        want_grad: bool = False,
        skip_first: int = 0,
        chunk_rows: int = 1024,
        stats_device: torch.device | None = None,
    ) -> None:
        self.targets = targets
        self.want_xtx = want_xtx
        self.want_abs = want_abs
        self.want_grad = want_grad
        self.skip_first = skip_first
        self.chunk_rows = chunk_rows
        self.stats_device = stats_device  # where the float64 sums live (None: with the activations)
        self.stats: dict[str, LayerStats] = {t.name: LayerStats(n=t.shape[1]) for t in targets}
        self._handles: list = []
        self._last_input: torch.Tensor | None = None
        self._last_owner: str | None = None
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []

    # -- accumulation -------------------------------------------------------------------------
    def _accumulate(self, st: LayerStats, x: torch.Tensor) -> None:
        """Add one call's statistics into ``st`` in place (no per-call n×n copy is kept)."""
        x = x.detach()
        if self.skip_first and x.dim() >= 3 and x.shape[-2] > self.skip_first:
            x = x[..., self.skip_first :, :]
        x = x.reshape(-1, x.shape[-1])
        dev = self.stats_device or x.device
        if self.want_xtx:
            if st.xtx is None:
                st.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=dev)
            # chunk products in the input's precision (at least float32) where the activations are,
            # summed in float64 on the statistics device: float64 matmuls cost twice as much on CPU
            # (and 32-64x on consumer GPUs) and a 1024-row float32 sum loses ~1e-7
            dt = torch.float64 if x.dtype == torch.float64 else torch.float32
            for i in range(0, x.shape[0], self.chunk_rows):
                xc = x[i : i + self.chunk_rows].to(dt)
                prod = xc.T @ xc
                # the float32 product added into the float64 sum, cast element by element on the way (a float64
                # copy of an n×n product first would be 0.3 GB more at the peak for a 6144-wide down_proj)
                st.xtx.add_(prod if prod.device == st.xtx.device else prod.to(dev))
                del prod
        if self.want_abs:
            a = x.abs().to(torch.float64).sum(0).to(dev)
            st.abs_sum = a if st.abs_sum is None else st.abs_sum.add_(a)
        st.rows += x.shape[0]
        st.batches += 1

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            st = self.stats[name]
            owner = self.stats[self._last_owner] if self._last_input is x and self._last_owner else None
            if owner is not None and (st.extra.get("shares") == self._last_owner or (
                    st.rows == 0 and owner.batches == 1)):
                # the same input as the previous layer (q/k/v, gate/up) from the first call on:
                # share its sums instead of computing and storing the same n×n matrix again
                st.extra["shares"] = self._last_owner
                st.xtx, st.abs_sum, st.rows, st.batches = owner.xtx, owner.abs_sum, owner.rows, owner.batches
                return
            if st.extra.get("shares"):  # the sums of the two layers can no longer be told apart
                raise RankwiseError(
                    f"{name} received the same input tensor as {st.extra['shares']} on the first calibration "
                    "call but a different one later; rankwise shares their statistics, so it cannot handle this "
                    "model's forward (please report it)."
                )
            self._accumulate(st, x)
            self._last_input, self._last_owner = x, name

        return hook

    def _grad_hook(self, target: Target):
        st = self.stats[target.name]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            g = grad.detach().to(torch.float64)
            g = g.T if target.transposed else g
            sq = (g * g).sum(1).to(self.stats_device or g.device)
            st.grad_sq = sq if st.grad_sq is None else st.grad_sq.add_(sq)
            return grad

        return hook

    def __enter__(self) -> StatsCollector:
        for t in self.targets:
            if self.want_xtx or self.want_abs:
                self._handles.append(t.module.register_forward_hook(self._hook(t.name)))
            if self.want_grad:
                p = t.module.weight
                self._grad_flags.append((p, p.requires_grad))
                p.requires_grad_(True)
                self._handles.append(p.register_hook(self._grad_hook(t)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
            p.grad = None
        self._grad_flags.clear()
        self._last_input, self._last_owner = None, None

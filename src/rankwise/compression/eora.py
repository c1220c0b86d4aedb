"""EoRA: training-free low-rank compensation of compressed weights (docs/methods.md §3 "eora").

Given a layer whose weight was compressed (quantised and/or pruned) to W′ and its
original weight W, the compression error is ΔW = W − W′. With the layer's input
second moment C = XᵀX = Q Λ Qᵀ (float64, from calibration), EoRA takes the SVD of
ΔW·Q Λ^{1/2}, truncates it to rank r and maps back with Λ^{−1/2} Qᵀ. The result
B A (B m×r, A r×n) minimises the layer's output error ‖(ΔW − B A) Xᵀ‖_F among
all rank-r matrices; the discarded σᵢ² are exactly that error. B A is added as a
residual path beside the frozen W′ (:class:`EoraLinear`): y = W′x + b + B(Ax).

:func:`quantize_rtn_` and :func:`prune_magnitude_` are simple ways to produce W′;
both return the original weights that :func:`eora_compensate` needs.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.compression.calibration.stats import LayerStats, StatsCollector
from rankwise.compression.runner import BlockRunner, find_blocks
from rankwise.engine.svd import thin_svd
from rankwise.engine.whitening import inverse_sqrt_factor
from rankwise.errors import RankwiseError
from rankwise.quantization.fake import _target, prune_magnitude_, quantize_rtn_
from rankwise.surgery.modules import set_module
from rankwise.surgery.targets import Target, is_matrix_module

__all__ = ["EoraLinear", "eora_compensate", "eora_factors", "prune_magnitude_", "quantize_rtn_"]


# -- the factorisation ---------------------------------------------------------------------------------


def eora_factors(
    delta: torch.Tensor, xtx: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EoRA factors of a compression error ΔW (m×n) under input statistics C = XᵀX (n×n), float64.

    Returns ``(B, A, sigma)``: B (m×r) and A (r×n) with B A minimising ‖(ΔW − B A) Xᵀ‖_F over
    rank-r matrices, and ``sigma``, all singular values of ΔW·Q Λ^{1/2} (descending); the
    error of the rank-r result is Σ_{i≥r} σᵢ². The singular values are split evenly
    between the factors (B = U_r √σ_r, A = √σ_r V_rᵀ Λ^{−1/2} Qᵀ). Tiny eigenvalues of C
    are clamped (see :func:`rankwise.engine.whitening.inverse_sqrt_factor`). ``rank`` may
    be anything from 1 to min(m, n); at min(m, n), B A = ΔW.
    """
    d = delta.detach().to(torch.float64)
    if d.dim() != 2 or xtx.shape != (d.shape[1], d.shape[1]):
        raise RankwiseError(
            f"EoRA needs ΔW (m×n) and XᵀX (n×n); got shapes {tuple(delta.shape)} and {tuple(xtx.shape)}."
        )
    m, n = d.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise RankwiseError(f"rank must be an integer from 1 to {min(m, n)} for a {m}×{n} matrix, got {rank!r}.")
    S, S_inv = inverse_sqrt_factor(xtx.to(d.device))
    U, sigma, Vh = thin_svd(d @ S)
    root = sigma[:rank].sqrt()
    B = U[:, :rank] * root
    A = (root[:, None] * Vh[:rank]) @ S_inv
    return B, A, sigma


# -- the layer -----------------------------------------------------------------------------------------


class EoraLinear(nn.Module):
    """A frozen compressed layer plus a low-rank residual path: y = base(x) + B (A x).

    ``base`` is the compressed ``nn.Linear`` or GPT-2 ``Conv1D`` (its parameters are
    frozen); ``A`` (r×in) and ``B`` (out×r) are trainable parameters in the base weight's
    dtype and device, so the state dict stores ``<name>.base.weight``, ``<name>.A`` and
    ``<name>.B``.
    """

    def __init__(self, base: nn.Module, B: torch.Tensor, A: torch.Tensor) -> None:
        super().__init__()
        if not is_matrix_module(base):
            raise RankwiseError(f"EoraLinear wraps an nn.Linear or Conv1D, not a {type(base).__name__}.")
        t = Target(name="base", module=base)
        m, n = t.shape
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != m or A.shape[1] != n or B.shape[1] != A.shape[0]:
            raise RankwiseError(
                f"EoRA factors B {tuple(B.shape)} and A {tuple(A.shape)} do not fit a {m}×{n} layer "
                f"(need B: {m}×r, A: r×{n})."
            )
        self.base = base.requires_grad_(False)
        w = base.weight
        self.in_features, self.out_features, self.rank = n, m, int(A.shape[0])
        self.A = nn.Parameter(A.detach().to(device=w.device, dtype=w.dtype).clone())
        self.B = nn.Parameter(B.detach().to(device=w.device, dtype=w.dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.A), self.B)

    @property
    def num_params(self) -> int:
        """Numbers stored by the residual factors: rank·(in + out)."""
        return self.rank * (self.in_features + self.out_features)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W′ + B A as an out×in matrix (in the base weight's dtype)."""
        return Target(name="base", module=self.base).weight() + self.B @ self.A

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# -- the model-level entry point -------------------------------------------------------------------------


def _check_stats(t: Target, st: LayerStats) -> torch.Tensor:
    if st.rows == 0 or st.xtx is None:
        raise RankwiseError(f"layer {t.name} received no calibration input; the forward loop must run the whole model.")
    if not bool(torch.isfinite(st.xtx).all()):
        raise RankwiseError(f"calibration statistics of {t.name} contain NaN/inf; check the model weights.")
    return st.xtx


def eora_compensate(
    model: nn.Module,
    original: dict[str, torch.Tensor],
    rank: int,
    calib: Any,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Add EoRA residual paths of rank ``rank`` beside the compressed layers of ``model``, in place.

    ``original``: the uncompressed weights by module name, out×in (what :func:`quantize_rtn_`
    and :func:`prune_magnitude_` return); the model's current weights are the compressed W′.
    ``calib``: a text spec (``"ptb"``, a .txt path; needs ``tokenizer`` or the model's own), a
    LongTensor of token windows (samples × seq_len), or a ``forward_loop(model)`` callable.
    Statistics C = XᵀX are collected on the compressed model's inputs, block by block; each
    layer is replaced by an :class:`EoraLinear` with factors computed in float64.

    Returns a report: ``layers`` maps each name to its rank and its calibration output error
    ‖(W − Ŵ) Xᵀ‖²_F before (Ŵ = W′) and after (Ŵ = W′ + B A) compensation, absolute
    (``err_before``/``err_after``) and relative to ‖W Xᵀ‖²_F (``rel_before``/``rel_after``);
    plus ``rank``, ``params_added``, ``calibration`` and ``seconds``.
    """
    from rankwise.compression.api import CompressConfig, resolve_calib

    t0 = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise RankwiseError(f"EoRA rank must be a positive integer, got {rank!r}.")
    if not isinstance(original, dict) or not original:
        raise RankwiseError("original must be a non-empty dict of module name → original (out×in) weight.")
    targets: list[Target] = []
    for name, W in original.items():
        t = _target(model, name)
        m, n = t.shape
        if not isinstance(W, torch.Tensor) or tuple(W.shape) != (m, n):
            got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
            raise RankwiseError(
                f"original weight of {name} has shape {got} but the layer is {m}×{n} (out×in); pass the weights "
                "returned by quantize_rtn_ / prune_magnitude_."
            )
        if rank >= min(m, n):
            raise RankwiseError(
                f"EoRA rank {rank} is not below min(out, in) = {min(m, n)} of {name} ({m}×{n}); choose a smaller rank."
            )
        if not bool(torch.isfinite(W).all()):
            raise RankwiseError(f"original weight of {name} contains NaN/inf.")
        targets.append(t)
    config = CompressConfig(batch_size=batch_size, progress=progress)
    loop, info = resolve_calib(model, config, calib, tokenizer)

    layers: dict[str, dict] = {}
    params_added = 0

    def compensate(tg: list[Target], stats: dict[str, LayerStats]) -> None:
        nonlocal params_added
        for t in tg:
            C = _check_stats(t, stats[t.name])
            W = original[t.name].detach().to(device=C.device, dtype=torch.float64)
            delta = W - t.weight().to(device=C.device, dtype=torch.float64)
            B, A, _ = eora_factors(delta, C, rank)
            if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                raise RankwiseError(f"EoRA factors of {t.name} contain NaN/inf; check the weights and statistics.")
            R = delta - B @ A
            total = float(torch.einsum("ij,jk,ik->", W, C, W))
            before = float(torch.einsum("ij,jk,ik->", delta, C, delta))
            after = float(torch.einsum("ij,jk,ik->", R, C, R))
            layers[t.name] = {
                "rank": rank,
                "err_before": before,
                "err_after": after,
                "rel_before": before / total if total > 0 else float("nan"),
                "rel_after": after / total if total > 0 else float("nan"),
            }
            layer = EoraLinear(t.module, B, A)
            params_added += layer.num_params
            set_module(model, t.name, layer)
            stats.pop(t.name, None)

    was_training = model.training
    model.eval()
    try:
        blocks = find_blocks(model, targets)
        inside = [t for t in targets if blocks is not None and t.name in blocks.index_of]
        outside = [t for t in targets if t not in inside]
        outside_stats: dict[str, LayerStats] = {}
        if outside:  # layers outside repeated blocks (or a model without blocks): one full pass
            with StatsCollector(outside) as col, torch.no_grad():
                loop(model)
            outside_stats = col.stats
            for t in outside:
                _check_stats(t, outside_stats[t.name])
        if inside:
            if blocks is None:  # targets inside blocks imply blocks were found
                raise RuntimeError("rankwise bug: targets inside decoder blocks but no blocks found")
            by_block = blocks.targets_of(inside)
            collectors: dict[int, StatsCollector] = {}

            def collect(i: int) -> StatsCollector:
                collectors[i] = StatsCollector(by_block.get(i, []))
                return collectors[i]

            def step(i: int, block: nn.Module) -> bool:
                # the block ran before this swap: the next block sees the compressed (uncompensated) outputs
                tg = by_block.get(i, [])
                if tg:
                    compensate(tg, collectors.pop(i).stats)
                return bool(tg)

            with BlockRunner(model, blocks, loop, progress=progress) as runner:
                runner.walk(step, collect=collect, sequential=False, desc="EoRA")
        if outside:
            compensate(outside, outside_stats)
    finally:
        if was_training:
            model.train()
    return {
        "rank": rank,
        "layers": {t.name: layers[t.name] for t in targets},
        "params_added": params_added,
        "calibration": info.to_dict() if info else None,
        "seconds": time.perf_counter() - t0,
    }

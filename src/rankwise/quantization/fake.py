"""Simple in-place ways to produce a compressed W′ for EoRA: symmetric fake quantisation and magnitude pruning.

Both keep the weights in floating point (fake quantisation: few distinct values, not packed
storage; :func:`rankwise.quantize` stores real packed low-bit weights) and return the original
weights that :func:`rankwise.compression.eora.eora_compensate` needs. Moved here from
``rankwise.compression.eora``, which re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.targets import Target, find_targets, is_matrix_module

__all__ = ["prune_magnitude_", "quantize_rtn_"]


# -- target resolution -------------------------------------------------------------------------------


def _target(model: nn.Module, name: str) -> Target:
    try:
        mod = model.get_submodule(name)
    except AttributeError as exc:
        raise RankwiseError(f"the model has no module named {name!r}; use names from model.named_modules().") from exc
    if not is_matrix_module(mod):
        raise RankwiseError(
            f"module {name!r} is a {type(mod).__name__}, not an nn.Linear or Conv1D; EoRA compensates linear layers."
        )
    return Target(name=name, module=mod)


def _resolve_targets(model: nn.Module, targets: str | Iterable[str] | None) -> list[Target]:
    if targets is None or isinstance(targets, str):
        return find_targets(model, targets)
    out = [_target(model, n) for n in targets]
    if not out:
        raise RankwiseError("targets is empty; pass None (all linear layers), a regex, or a list of module names.")
    return out


# -- producing W′ --------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_rtn_(
    model: nn.Module, bits: int = 4, group_size: int | None = 64, targets: str | Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Round-to-nearest symmetric per-group weight quantisation, in place (fake-quant: weights stay float).

    Each output row of W (out×in) is cut into groups of ``group_size`` consecutive input
    columns (``None``: one group per row); a group's values are rounded to the integer
    grid {−q, …, q}, q = 2^(bits−1) − 1, with step max|w|/q. ``targets``: ``None`` (every
    Linear/Conv1D except the LM head and tied layers), a regex over module names, or a
    list of names. Returns the original weights by module name, out×in (``Target.weight``
    layout, also for GPT-2 Conv1D), cloned.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise RankwiseError(f"bits must be an integer from 2 to 16, got {bits!r}.")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise RankwiseError(f"group_size must be a positive integer or None (per row), got {group_size!r}.")
    qmax = 2 ** (bits - 1) - 1
    originals: dict[str, torch.Tensor] = {}
    for t in _resolve_targets(model, targets):
        W = t.weight()
        originals[t.name] = W.clone()
        m, n = W.shape
        g = n if group_size is None else min(group_size, n)
        pad = (-n) % g
        dt = torch.float64 if W.dtype == torch.float64 else torch.float32
        Wg = F.pad(W.to(dt), (0, pad)).reshape(m, -1, g)
        scale = Wg.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(dt).tiny) / qmax
        Wq = (torch.round(Wg / scale).clamp_(-qmax, qmax) * scale).reshape(m, n + pad)[:, :n]
        t.set_weight(Wq)
    return originals


@torch.no_grad()
def prune_magnitude_(
    model: nn.Module, sparsity: float = 0.5, targets: str | Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Unstructured magnitude pruning, in place: zero the ``sparsity`` fraction of smallest |w| of each matrix.

    ``targets`` as in :func:`quantize_rtn_`. Returns the original weights by module name
    (out×in, cloned).
    """
    try:
        s = float(sparsity)
    except (TypeError, ValueError) as exc:
        raise RankwiseError(f"sparsity must be a number in [0, 1), got {sparsity!r}.") from exc
    if not 0.0 <= s < 1.0:
        raise RankwiseError(f"sparsity must lie in [0, 1) (the fraction of weights zeroed), got {s}.")
    originals: dict[str, torch.Tensor] = {}
    for t in _resolve_targets(model, targets):
        W = t.weight()
        originals[t.name] = W.clone()
        k = int(round(s * W.numel()))
        if k == 0:
            continue
        flat = W.clone().reshape(-1)
        idx = torch.topk(flat.abs().to(torch.float32), k, largest=False).indices
        flat[idx] = 0
        t.set_weight(flat.reshape(W.shape))
    return originals

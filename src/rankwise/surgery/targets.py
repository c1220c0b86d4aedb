"""Find the weight matrices of a model that rankwise acts on.

A *target* is an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight stored
transposed, in×out). :class:`Target` hides that difference: ``.weight()`` is
always the m×n (out×in) matrix, and ``.set_weight()`` writes it back in the
module's own layout. This is the one place that knows about Conv1D storage.

By default every such layer is a target except the output embedding (LM head)
and any layer whose weight is tied to the input embedding. Selection is by
regular expression over module names, never by model family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.errors import RankwiseError

try:  # transformers' GPT-2 style Conv1D: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def is_matrix_module(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and ``Conv1D`` (the layers rankwise can factorise)."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


@dataclass
class Target:
    """One targeted weight matrix: its module name, the module, and its layout."""

    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """True when the module stores W as in×out (Conv1D)."""
        return bool(Conv1D) and isinstance(self.module, Conv1D)

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) = (out_features, in_features)."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    @property
    def num_params(self) -> int:
        m, n = self.shape
        return m * n

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def weight(self) -> torch.Tensor:
        """The m×n (out×in) weight, detached (a view: no copy)."""
        w = self.module.weight.detach()
        return w.T if self.transposed else w

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Write an m×n weight back into the module's own layout."""
        dst = self.module.weight
        dst.copy_((w.T if self.transposed else w).to(dst.dtype))


def _storage_key(w: torch.Tensor) -> int:
    """What makes two weights the same tensor: the data pointer, or the object itself on the meta device
    (a skeleton built with accelerate's ``init_empty_weights`` has every data pointer 0)."""
    return id(w) if w.is_meta else w.data_ptr()


def _excluded_ids(model: nn.Module) -> set[int]:
    """ids of modules never targeted by default: the LM head and anything tied to the embeddings."""
    out: set[int] = set()
    tied_ptrs: set[int] = set()
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        emb = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        emb = None
    try:
        head = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        head = None
    if head is not None:
        out.add(id(head))
    if emb is not None and getattr(emb, "weight", None) is not None:
        tied_ptrs.add(_storage_key(emb.weight))
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and _storage_key(w) in tied_ptrs and is_matrix_module(mod):
            out.add(id(mod))
    return out


def _factor_ids(model: nn.Module) -> set[int]:
    """ids of the Linear children inside factorised layers (a LowRankLinear's A and B are factors, not targets)."""
    from rankwise.surgery.layers import is_factorised

    out: set[int] = set()
    for mod in model.modules():
        if is_factorised(mod):
            out.update(id(m) for m in mod.modules() if m is not mod)
    return out


def find_targets(
    model: nn.Module,
    pattern: str | None = None,
    exclude: str | None = None,
    include_heads: bool = False,
) -> list[Target]:
    """All target matrices of ``model``, in module order.

    ``pattern``: a regex searched in each module name (``re.search``); ``None``
    means every Linear/Conv1D. ``exclude``: a regex of names to drop.
    ``include_heads``: also allow the LM head / tied layers. The factors inside
    factorised layers (a LowRankLinear's ``A`` and ``B``) are never targets.

    Raises :class:`RankwiseError` when nothing matches, listing a few names.
    """
    try:
        rx = re.compile(pattern) if pattern else None
        ex = re.compile(exclude) if exclude else None
    except re.error as exc:
        raise RankwiseError(f"--targets is not a valid regular expression ({exc}); e.g. 'q_proj|v_proj'.") from exc
    skip = set() if include_heads else _excluded_ids(model)
    skip |= _factor_ids(model)
    candidates: list[Target] = []
    found: list[Target] = []
    for name, mod in model.named_modules():
        if not is_matrix_module(mod) or id(mod) in skip:
            continue
        t = Target(name=name, module=mod)
        candidates.append(t)
        if rx is not None and not rx.search(name):
            continue
        if ex is not None and ex.search(name):
            continue
        found.append(t)
    if not found:
        if not candidates:
            raise RankwiseError(
                "the model has no nn.Linear or Conv1D layers to act on; rankwise factorises "
                "linear layers only."
            )
        names = ", ".join(t.name for t in candidates[:5])
        raise RankwiseError(
            f"targets {pattern!r} match no linear layer; available names include: {names} "
            f"(pass a regex such as 'self_attn|mlp')."
        )
    return found

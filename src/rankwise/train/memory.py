"""Count optimizer-state memory from the state tensors themselves.

Works for any ``torch.optim.Optimizer``: it walks every parameter's state
(tensors, containers and plain objects such as galore-torch's
``GaLoreProjector`` holding its ``ortho_matrix``), counts each tensor storage
once, and splits the total into the parameters that get a low-rank update
("projected": matrices in a group with ``rank``) and the rest. Tensors shared by
many parameters (rankwise's DCT bases) are counted once, in the projected part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class StateMemory:
    """Optimizer-state bytes: ``total`` = ``projected`` + ``plain``; ``shared`` is inside ``projected``.

    Bytes are *resident* bytes: the whole storage behind each state tensor, counted once. A slice that
    keeps a larger buffer alive (galore-torch 1.0 stores ``Vh[:r]`` / ``U[:, :r]`` views of the full SVD
    factors) is counted with that buffer. ``logical`` counts numel × element size of the tensors instead.
    """

    total: int
    projected: int
    plain: int
    shared: int
    projected_params: int
    plain_params: int
    logical: int = 0
    logical_projected: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # meta or exotic tensors
        return (id(t), 0)


def _tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if depth > 6:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, depth + 1)]
    if isinstance(obj, (list, tuple, set)):
        return [t for v in obj for t in _tensors(v, depth + 1)]
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return [t for v in vars(obj).values() for t in _tensors(v, depth + 1)]
    return []


def tensor_bytes(obj: Any, seen: set | None = None, logical: list[int] | None = None) -> int:
    """Resident bytes of all tensors reachable from ``obj`` (each storage once).

    ``logical``, when given, is a one-element list incremented by numel × element size of the new tensors.
    """
    seen = set() if seen is None else seen
    total = 0
    for t in _tensors(obj):
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        if logical is not None:
            logical[0] += t.numel() * t.element_size()
        try:
            total += int(t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            total += t.numel() * t.element_size()
    return total


def _is_projected(opt: torch.optim.Optimizer, p: torch.Tensor, group: dict[str, Any]) -> bool:
    fn = getattr(opt, "is_projected", None)
    if callable(fn):
        return bool(fn(p, group))
    return "rank" in group and p.dim() == 2


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> StateMemory:
    """Bytes held by ``optimizer``'s state, split into projected matrices and the rest."""
    seen: set = set()
    projected = plain = 0
    n_proj = n_plain = 0
    log_proj, log_plain = [0], [0]
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st:
                continue
            if _is_projected(optimizer, p, group):
                projected += tensor_bytes(st, seen, log_proj)
                n_proj += 1
            else:
                plain += tensor_bytes(st, seen, log_plain)
                n_plain += 1
    shared = 0
    fn = getattr(optimizer, "shared_state_tensors", None)
    if callable(fn):
        shared = sum(tensor_bytes(t, seen, log_proj) for t in fn())
    projected += shared
    return StateMemory(
        total=projected + plain,
        projected=projected,
        plain=plain,
        shared=shared,
        projected_params=n_proj,
        plain_params=n_plain,
        logical=log_proj[0] + log_plain[0],
        logical_projected=log_proj[0],
    )


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

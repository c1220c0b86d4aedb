"""Scoped control of torch's intra-op thread count.

Small per-matrix decompositions gain little from several threads, and on an
oversubscribed CPU OpenMP threads spin against each other (measured here: 10
eigvalsh of 576×576 took 0.5 s on 1 thread and 100 s on 2 busy cores), so the
verbs run their decompositions inside :func:`torch_threads`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``/0: unchanged), then restore."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)

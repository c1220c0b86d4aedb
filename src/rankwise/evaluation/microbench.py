"""Layer microbenchmark: seconds per call of a dense m×n layer against rank-k factorised ones."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rankwise.errors import RankwiseError


def _mean_time(fn: Callable[[], object], reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    t = clock()
    for _ in range(reps):
        fn()
    return (clock() - t) / reps


@torch.inference_mode()
def time_layers(
    m: int,
    n: int,
    ranks: Sequence[int],
    tokens: int = 512,
    rounds: int = 7,
    target_s: float = 0.01,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    clock: str = "wall",
) -> tuple[float, dict[int, float]]:
    """Seconds per call of a dense m×n layer and of rank-k factorised layers on (1, tokens, n) inputs.

    The dense and factorised calls are timed alternately (``rounds`` rounds),
    each round long enough (~``target_s``) to beat timer noise; the fastest
    round counts (on a shared machine noise only ever adds time). ``clock="cpu"``
    uses process CPU time instead of wall time (for 1-thread runs on a busy machine).
    Returns (dense seconds, {rank: factorised seconds}).
    """
    if clock not in ("wall", "cpu"):
        raise RankwiseError(f"clock must be 'wall' or 'cpu', got {clock!r}.")
    tick = time.perf_counter if clock == "wall" else time.process_time
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, n, generator=g, dtype=dtype)
    w = torch.randn(m, n, generator=g, dtype=dtype)
    fns: dict[object, Callable[[], object]] = {"dense": lambda: F.linear(x, w)}
    for k in ranks:
        a = torch.randn(k, n, generator=g, dtype=dtype)
        b = torch.randn(m, k, generator=g, dtype=dtype)
        fns[int(k)] = lambda a=a, b=b: F.linear(F.linear(x, a), b)
    reps = {}
    for key, fn in fns.items():  # warm-up, and size each round to ~target_s
        fn()
        one = _mean_time(fn, 3)
        reps[key] = max(1, min(2000, int(target_s / max(one, 1e-7))))
    times: dict[object, list[float]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            times[key].append(_mean_time(fn, reps[key], tick))
    dense = min(times.pop("dense"))
    return dense, {int(k): min(v) for k, v in times.items()}

"""Many processes (torch.distributed, gloo on CPU): two processes give what one process gives.

Two gloo processes are spawned once per test (``torch.multiprocessing``), or launched with torchrun
for the CLI; each writes what it computed to a file and the test compares it with a one-process run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from rankwise.compression.calibration.stats import LayerStats
from rankwise.compression.distributed import Dist
from rankwise.errors import RankwiseError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> Dist:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    return Dist.current()


def _stats_of(rank: int) -> dict[str, LayerStats]:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5 + rank, 4, generator=g, dtype=torch.float64)
    a = LayerStats(n=4, xtx=x.T @ x, abs_sum=x.abs().sum(0), grad_sq=torch.rand(3, generator=g, dtype=torch.float64),
                   rows=x.shape[0], batches=1)
    b = LayerStats(n=4)  # no rows on rank 1: still takes part
    if rank == 0:
        b = LayerStats(n=4, xtx=x.T @ x, abs_sum=x.abs().sum(0), rows=x.shape[0], batches=2)
    return {"a": a, "b": b}


def _primitives_worker(rank: int, world: int, port: int, out: str) -> None:
    d = _init(rank, world, port)
    import torch.distributed as tdist

    res: dict = {"world": d.world, "rank": d.rank, "enabled": d.enabled, "writer": d.is_writer}
    stats = _stats_of(rank)
    d.all_reduce_stats(stats)
    res["stats"] = {k: (v.xtx, v.abs_sum, v.grad_sq, v.rows, v.batches) for k, v in stats.items()}
    res["shard"] = d.shard_windows(torch.arange(10).view(5, 2))
    res["shard_batches"] = d.shard_windows(list(range(7)), batch_size=2)
    try:
        d.shard_windows(torch.zeros(1, 4))
    except RankwiseError as exc:
        res["too_few"] = str(exc)
    calls: list[str] = []

    def fn(name: str) -> dict:
        calls.append(name)
        return {"w": torch.full((2, len(name)), float(len(name)) + rank), "k": len(name), "who": rank}

    res["shared"] = d.map_shared(["x", "yy", "zzz"], fn)
    res["calls"] = calls

    def bad(name: str) -> dict:
        if name == "yy":
            raise RankwiseError("boom")
        return {"w": torch.zeros(1)}

    try:
        d.map_shared(["x", "yy", "zzz"], bad)
    except RankwiseError as exc:
        res["bad"] = str(exc)
    t = torch.tensor([float(rank + 1)])
    d.all_reduce_(t)
    res["sum"] = float(t)
    d.barrier()
    torch.save(res, Path(out) / f"rank{rank}.pt")
    tdist.destroy_process_group()


def _spawn(fn, tmp_path: Path, world: int = 2, *extra) -> list[dict]:
    mp.start_processes(fn, args=(world, _free_port(), str(tmp_path), *extra), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_single_process_is_a_noop():
    d = Dist.current()
    assert (d.world, d.rank, d.enabled, d.is_writer) == (1, 0, False, True)
    w = torch.arange(6).view(3, 2)
    assert d.shard_windows(w) is w
    stats = _stats_of(0)
    before = stats["a"].xtx.clone()
    d.all_reduce_stats(stats)
    assert torch.equal(stats["a"].xtx, before)
    assert d.map_shared(["p", "q"], lambda n: {"n": n}) == {"p": {"n": "p"}, "q": {"n": "q"}}


def test_primitives_two_processes(tmp_path):
    r0, r1 = _spawn(_primitives_worker, tmp_path)
    assert (r0["world"], r0["rank"], r0["enabled"], r0["writer"]) == (2, 0, True, True)
    assert (r1["world"], r1["rank"], r1["writer"]) == (2, 1, False)
    s0, s1 = _stats_of(0), _stats_of(1)
    for r in (r0, r1):
        xtx, ab, gs, rows, batches = r["stats"]["a"]
        torch.testing.assert_close(xtx, s0["a"].xtx + s1["a"].xtx)
        torch.testing.assert_close(ab, s0["a"].abs_sum + s1["a"].abs_sum)
        torch.testing.assert_close(gs, s0["a"].grad_sq + s1["a"].grad_sq)
        assert (rows, batches) == (11, 2) and xtx.dtype == torch.float64
        xtx, ab, gs, rows, batches = r["stats"]["b"]
        torch.testing.assert_close(xtx, s0["b"].xtx)  # rank 1 had no rows for "b" but took part
        assert gs is None and (rows, batches) == (5, 2)
    assert torch.equal(r0["shard"], torch.tensor([[0, 1], [4, 5], [8, 9]]))
    assert torch.equal(r1["shard"], torch.tensor([[2, 3], [6, 7]]))
    assert r0["shard_batches"] == [0, 1, 4, 5] and r1["shard_batches"] == [2, 3, 6]
    assert "more processes than calibration windows" in r0["too_few"] and "\n" not in r0["too_few"]
    # item i on rank i % 2, broadcast: both ranks see rank 0's x and zzz and rank 1's yy
    assert r0["calls"] == ["x", "zzz"] and r1["calls"] == ["yy"]
    for r in (r0, r1):
        assert list(r["shared"]) == ["x", "yy", "zzz"]
        assert [r["shared"][n]["who"] for n in ("x", "yy", "zzz")] == [0, 1, 0]
        assert torch.equal(r["shared"]["yy"]["w"], torch.full((2, 2), 3.0))
        assert torch.equal(r["shared"]["zzz"]["w"], torch.full((2, 3), 3.0)) and r["shared"]["zzz"]["k"] == 3
        assert "boom" in r["bad"]  # raised on rank 1, reported on both
        assert r["sum"] == 3.0

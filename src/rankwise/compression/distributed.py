"""Many processes through ``torch.distributed``: one object the compression stages ask "who does what".

``torchrun --nproc-per-node N -m rankwise compress ...`` (or the Python API inside an initialised
process group) splits a compression run like this:

* every process runs 1/N of the calibration windows (:meth:`Dist.shard_windows`);
* the statistics the stages accumulate (XᵀX, ``|x|`` sums, squared-gradient row sums, row and batch
  counts) are summed over the processes in float64 (:meth:`Dist.all_reduce_stats`), so every process
  holds the statistics of *all* windows; the result equals one process's up to float summation order;
* the factorisations of a block's matrices are shared out, matrix i on process ``i % N``, and their
  results broadcast (:meth:`Dist.map_shared`), so every process builds the same compressed block;
* process 0 writes (:attr:`Dist.is_writer`); the others write nothing.

Without a process group (and without torchrun's ``RANK``/``WORLD_SIZE`` in the environment)
:meth:`Dist.current` returns a single-process object whose methods do nothing, so one process
behaves exactly as before. torch.distributed has no "share a list of jobs and broadcast their
outputs" primitive and accelerate's helpers gather Python objects by pickling; tensors here go
through the collectives directly (one pickled metadata exchange per :meth:`map_shared` call).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from rankwise.errors import RankwiseError

T = TypeVar("T")


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        return default


def _is_cuda(device: str | torch.device | None) -> bool:
    if device is None:
        return False
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


_OWNED_GROUP = False


def _destroy_owned_group() -> None:
    if _OWNED_GROUP and tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


@dataclass
class Dist:
    """Who this process is in a (possibly one-process) run, and the collectives the stages need.

    ``world``: number of processes; ``rank``: this one's index; ``enabled``: a process group with
    more than one process is in use (otherwise every method is a no-op); ``is_writer``: this
    process writes outputs (rank 0). ``local_rank``: index on this machine (CUDA device to use).
    """

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    _group: Any = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def current(cls, device: str | torch.device | None = None) -> Dist:
        """The process group in use, initialising one when launched by torchrun and none exists yet.

        ``device``: where this process computes (``cuda``/``cuda:N``/``auto`` with CUDA present →
        NCCL for CUDA tensors, with gloo beside it for CPU tensors; otherwise gloo). Without
        torch.distributed initialised and without torchrun's environment: a one-process no-op.
        """
        global _OWNED_GROUP
        if not tdist.is_available():
            return cls()
        if not tdist.is_initialized():
            if not _launched_by_torchrun() or _env_int("WORLD_SIZE", 1) <= 1:
                return cls(local_rank=_env_int("LOCAL_RANK", 0))
            cuda = _is_cuda(device) and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
            try:
                tdist.init_process_group(backend=backend)
            except Exception as exc:  # noqa: BLE001 - one line for any rendezvous/backend failure
                raise RankwiseError(
                    f"cannot start the torch.distributed process group ({backend}) that torchrun asked for "
                    f"(RANK={os.environ.get('RANK')}, WORLD_SIZE={os.environ.get('WORLD_SIZE')}): {exc}"
                ) from exc
            if not _OWNED_GROUP:
                _OWNED_GROUP = True
                atexit.register(_destroy_owned_group)
        return cls(
            world=tdist.get_world_size(), rank=tdist.get_rank(), local_rank=_env_int("LOCAL_RANK", 0),
            backend=str(tdist.get_backend()),
        )

    def device(self, device: torch.device) -> torch.device:
        """This process's CUDA device (``cuda:LOCAL_RANK``) when ``device`` is a bare ``cuda``; else ``device``."""
        if device.type == "cuda" and device.index is None and self.enabled:
            return torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        return device

    # -- work sharing -------------------------------------------------------------------------
    def shard_windows(self, windows: T, batch_size: int = 1) -> T:
        """This process's calibration windows: rows ``rank::world`` (a tensor's rows or a sequence's items).

        With ``batch_size`` > 1 and at least ``world`` whole batches, whole batches of consecutive
        rows go round-robin (batch b to process ``b % world``), so per-batch quantities such as the
        squared gradients of a batch loss are the same sums as in one process.
        """
        n = len(windows)  # type: ignore[arg-type]
        if not self.enabled:
            return windows
        if self.world > n:
            raise RankwiseError(
                f"more processes than calibration windows: {self.world} processes but {n} windows; "
                f"use at least {self.world} calibration samples (--calib-samples) or fewer processes."
            )
        n_batches = (n + batch_size - 1) // max(batch_size, 1)
        if batch_size > 1 and n_batches >= self.world:
            idx = [i for b in range(self.rank, n_batches, self.world)
                   for i in range(b * batch_size, min((b + 1) * batch_size, n))]
            if isinstance(windows, torch.Tensor):
                return windows[torch.tensor(idx, dtype=torch.long, device=windows.device)]  # type: ignore[return-value]
            return [windows[i] for i in idx]  # type: ignore[index,return-value]
        return windows[self.rank :: self.world]  # type: ignore[index]

    # -- collectives --------------------------------------------------------------------------
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on a device the group can reduce on (CPU tensors for a gloo-only group)."""
        if t.device.type == "cuda" and self.backend is not None and "nccl" not in self.backend:
            return t.cpu()
        if t.device.type == "cpu" and self.backend == "nccl":
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or ``max``) ``tensor`` over the processes, in place; returns it."""
        if not self.enabled:
            return tensor
        red = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op]
        buf = self._comm(tensor)
        if not buf.is_contiguous():
            buf = buf.contiguous()
        tdist.all_reduce(buf, op=red, group=self._group)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def all_reduce_stats(self, stats: dict) -> dict:
        """Sum :class:`~rankwise.compression.calibration.stats.LayerStats` over the processes, in place.

        XᵀX, ``abs_sum``, ``grad_sq`` (float64), ``rows`` and ``batches`` become sums over all
        processes' windows. A layer that saw no rows on this process (its tensors are ``None``)
        still takes part: it contributes zeros of the shape the other processes report. Every
        process must pass the same layer names.
        """
        if not self.enabled or not stats:
            return stats
        names = sorted(stats)
        # one exchange of what each process has: [has xtx, has abs, grad length, rows, batches] per layer
        meta = torch.zeros(len(names), 5, dtype=torch.float64)
        for i, name in enumerate(names):
            st = stats[name]
            meta[i, 0] = float(st.xtx is not None)
            meta[i, 1] = float(st.abs_sum is not None)
            meta[i, 2] = float(st.grad_sq.numel()) if st.grad_sq is not None else 0.0
            meta[i, 3] = float(st.rows)
            meta[i, 4] = float(st.batches)
        summed = meta[:, [0, 1, 3, 4]].contiguous()
        self.all_reduce_(summed)
        grad_len = meta[:, 2].contiguous()
        self.all_reduce_(grad_len, op="max")
        done: set[int] = set()
        for i, name in enumerate(names):
            st = stats[name]
            has_xtx, has_abs, rows, batches = summed[i].tolist()
            dev = _stats_device(st)
            if has_xtx:
                if st.xtx is None:
                    st.xtx = torch.zeros(st.n, st.n, dtype=torch.float64, device=dev)
                self._reduce_once(st.xtx, done)
            if has_abs:
                if st.abs_sum is None:
                    st.abs_sum = torch.zeros(st.n, dtype=torch.float64, device=dev)
                self._reduce_once(st.abs_sum, done)
            m = int(grad_len[i])
            if m:
                if st.grad_sq is None:
                    st.grad_sq = torch.zeros(m, dtype=torch.float64, device=dev)
                self._reduce_once(st.grad_sq, done)
            st.rows, st.batches = int(round(rows)), int(round(batches))
        return stats

    def _reduce_once(self, t: torch.Tensor, done: set[int]) -> None:
        # a tensor shared by several layers' stats must be summed once, not once per layer
        if id(t) in done:
            return
        done.add(id(t))
        if t.dtype != torch.float64:
            raise RankwiseError(f"statistics must be float64 to be summed over processes, got {t.dtype}.")
        self.all_reduce_(t)

    def map_shared(self, names: Sequence[str], fn: Callable[[str], dict | None]) -> dict[str, dict | None]:
        """``{name: fn(name)}`` with item i computed on process ``i % world`` and broadcast to all.

        ``fn`` returns a dict whose tensor values are broadcast with the collectives (other values
        travel pickled) or ``None``. Every process gets the same dict, in the order of ``names``,
        with bitwise-identical tensors. An error in ``fn`` on any process is raised on every
        process (so none waits forever in a collective).
        """
        names = list(names)
        if not self.enabled:
            return {name: fn(name) for name in names}
        mine: dict[int, dict | None] = {}
        error: str | None = None
        first_exc: BaseException | None = None
        for i in range(self.rank, len(names), self.world):
            try:
                mine[i] = fn(names[i])
            except Exception as exc:  # noqa: BLE001 - re-raised after every process knows
                error, first_exc = f"{type(exc).__name__}: {exc}", exc
                break
        # metadata of every item (tensor keys/shapes/dtypes, plain values) to every process, in one exchange
        local_meta = {"error": error, "items": {i: _describe(r) for i, r in mine.items()}} if error is None else {
            "error": error, "items": {}}
        gathered: list[Any] = [None] * self.world
        tdist.all_gather_object(gathered, local_meta, group=self._group)
        errors = [g["error"] for g in gathered if g["error"]]
        if errors:
            if first_exc is not None:
                raise first_exc
            raise RankwiseError(f"another process failed while factorising: {errors[0]}")
        meta: dict[int, Any] = {}
        for g in gathered:
            meta.update(g["items"])
        out: dict[str, dict | None] = {}
        for i, name in enumerate(names):
            src = i % self.world
            desc = meta[i]
            if desc is None:
                out[name] = None
                continue
            result = mine[i] if src == self.rank else {}
            if result is None:  # desc is None exactly when the owner's result is None, handled above
                raise RuntimeError(f"rankwise bug: no result for {name} on its owning rank {src}")
            for key, spec in desc.items():
                if spec[0] != "tensor":
                    result[key] = spec[1]
                    continue
                _, shape, dtype, dev = spec
                if src == self.rank:
                    t = result[key]
                    buf = self._comm(t.contiguous())
                else:
                    buf = self._comm(torch.empty(shape, dtype=getattr(torch, dtype)))
                tdist.broadcast(buf, src=src, group=self._group)
                if src != self.rank:
                    result[key] = buf.to(_local(dev))
            out[name] = result
        return out

    def barrier(self) -> None:
        """Wait until every process reaches this point (no-op in one process)."""
        if self.enabled:
            tdist.barrier(group=self._group)


def _local(device_type: str) -> torch.device:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _stats_device(st) -> torch.device:
    for t in (st.xtx, st.abs_sum, st.grad_sq):
        if t is not None:
            return t.device
    return torch.device("cpu")


def _describe(result: dict | None) -> dict | None:
    if result is None:
        return None
    if not isinstance(result, dict):
        raise RankwiseError(f"map_shared: fn must return a dict or None, got {type(result).__name__}.")
    desc: dict[str, tuple] = {}
    for key, value in result.items():
        if isinstance(value, torch.Tensor):
            desc[key] = ("tensor", tuple(value.shape), str(value.dtype).removeprefix("torch."), value.device.type)
        else:
            desc[key] = ("value", value)
    return desc

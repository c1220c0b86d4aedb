"""One block-by-block walk over calibration data, used by every calibration-driven stage.

Statistics, sequential calibration, the loss-sensitivity pass, FWSVD's gradients and
EoRA all run through :class:`BlockRunner`:

* the repeated blocks are found structurally (:func:`find_blocks`: the longest
  ``nn.ModuleList`` whose children hold target layers), never by model name;
* a **capture pass** runs the calibration loop once with every block's ``forward``
  replaced by a recorder that stores the (args, kwargs) that block receives and passes
  its hidden state through unchanged; the last recorder stops the forward. So each block
  keeps *its own* keyword arguments (sliding-window and global layers get different
  attention masks; position embeddings may differ) and no block is computed;
* the walk then runs block ℓ on the hidden states left by block ℓ−1. Hidden states stay
  on the CPU between blocks (:class:`HiddenStore`, spilled to disk beyond a budget) and
  each block is materialised on the work device only while it works (``load`` /
  ``release`` callbacks: a move to the device in memory, a read from safetensors when
  streaming a checkpoint);
* the backward walk (:meth:`BlockRunner.backward`) streams a loss backward: forward block
  by block keeping each block's input, the loss at the head (the model's own forward with
  every block passed through), then from the top block down: recompute the block from
  its stored input, backpropagate the upstream gradient, hand the input gradient down.
  Memory does not grow with depth (block-granularity checkpointing).
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.engine import heap
from rankwise.errors import RankwiseError
from rankwise.progress import progress as progress_bar
from rankwise.surgery.targets import Target

#: hidden states kept in RAM between two blocks before the rest spills to disk (bytes)
SPILL_BYTES = 4 << 30
_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past", "cache")  # "cache": transformers >= 5.24


class _Stop(Exception):
    """Raised by the last recorder to end a forward pass early."""


# -- finding the blocks --------------------------------------------------------------------------------


@dataclass
class Blocks:
    """The repeated blocks: their container name, the modules, and each target's block index."""

    prefix: str
    modules: list[nn.Module]
    index_of: dict[str, int]  # target name -> block index (targets outside blocks are absent)

    def targets_of(self, targets: list[Target]) -> dict[int, list[Target]]:
        """Targets grouped by block index (targets outside the blocks are left out)."""
        out: dict[int, list[Target]] = {}
        for t in targets:
            if t.name in self.index_of:
                out.setdefault(self.index_of[t.name], []).append(t)
        return out


def _indices(prefix: str, names: list[str]) -> dict[str, int]:
    pre = f"{prefix}." if prefix else ""
    out = {}
    for n in names:
        if n.startswith(pre):
            head = n[len(pre) :].split(".")[0]
            if head.isdigit():
                out[n] = int(head)
    return out


def find_blocks(model: nn.Module, targets: list[Target]) -> Blocks | None:
    """The longest ``nn.ModuleList`` whose children hold targets, or None if the model has none."""
    best: tuple[int, str, dict[str, int]] | None = None
    names = [t.name for t in targets]
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        index_of = _indices(name, names)
        if len(set(index_of.values())) < 2:
            continue
        if best is None or len(mod) > best[0]:
            best = (len(mod), name, index_of)
    if best is None:
        return None
    _, prefix, index_of = best
    return Blocks(prefix=prefix, modules=list(model.get_submodule(prefix)), index_of=index_of)


# -- hidden states between blocks ----------------------------------------------------------------------


class HiddenStore:
    """The hidden state of every calibration batch at one depth: CPU tensors, spilled to disk past a budget.

    ``budget`` is shared by all stores of one runner (a one-item list, bytes left), so the
    RAM held by hidden states stays under it however many stores are alive.
    """

    def __init__(self, spill_dir: Callable[[], Path], budget: list[int]) -> None:
        self._items: list[torch.Tensor | Path] = []
        self._spill_dir = spill_dir
        self._budget = budget
        self._ram = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        size = t.numel() * t.element_size()
        if size <= self._budget[0]:
            self._items.append(t.to("cpu", copy=t.device.type != "cpu"))
            self._budget[0] -= size
            self._ram += size
            return
        path = self._spill_dir() / f"h{id(self)}_{len(self._items)}.pt"
        try:
            torch.save(t.to("cpu"), path)
        except (OSError, RuntimeError) as exc:  # disk full / file-size limit: one line, not a traceback
            raise RankwiseError(f"cannot spill hidden states to {path.parent} ({str(exc).splitlines()[0][:100]}); "
                                "free disk space there or raise the RAM budget.") from exc
        self._items.append(path)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if not isinstance(item, Path):
            return item
        try:
            return torch.load(item, weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:  # a write that failed silently
            raise RankwiseError(f"cannot read back spilled hidden states {item} ({type(exc).__name__}); the disk "
                                "holding them is full or failing.") from exc

    def __len__(self) -> int:
        return len(self._items)

    @property
    def spilled(self) -> int:
        return sum(isinstance(x, Path) for x in self._items)

    def free(self) -> None:
        """Drop the tensors (and their files) and give their RAM back to the budget."""
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self._items.clear()
        self._budget[0] += self._ram
        self._ram = 0


# -- argument plumbing ---------------------------------------------------------------------------------


def _detach(obj: Any, memo: dict[int, Any]) -> Any:
    """Detach every tensor in a nested args/kwargs structure, keeping shared objects shared."""
    key = id(obj)
    if key in memo:
        return memo[key][1]
    if isinstance(obj, torch.Tensor):
        out: Any = obj.detach()
    elif isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        out = tuple(_detach(o, memo) for o in obj)
    elif isinstance(obj, list):
        out = [_detach(o, memo) for o in obj]
    elif isinstance(obj, dict):
        out = {k: _detach(v, memo) for k, v in obj.items()}
    else:
        out = obj
    memo[key] = (obj, out)  # keeping ``obj`` alive keeps its id from being reused by another object
    return out


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise RankwiseError("a decoder block was called without a hidden-state tensor; this model is not supported.")


class _Slot:
    """Placeholder for the hidden state in a recorded call (it comes from the walk, not the capture)."""


_HIDDEN = _Slot()


def _call_args(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """The recorded call with its hidden state slot filled by ``h`` and every KV cache switched off."""
    kwargs = dict(kwargs)
    for key in _CACHE_KEYS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args and (args[0] is _HIDDEN or isinstance(args[0], torch.Tensor)):
        return (h, *args[1:]), kwargs
    kwargs["hidden_states"] = h
    return args, kwargs


def block_output(out: Any) -> torch.Tensor:
    """The hidden state a block returns (a tensor, the first item of a tuple, or ``last_hidden_state``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise RankwiseError(f"a decoder block returned {type(out).__name__}; expected a tensor or a tuple.")


def _like(template: Any, h: torch.Tensor) -> Any:
    """``h`` in the structure the block returns (tensor, or a tuple whose first item is the hidden state)."""
    if isinstance(template, tuple):
        return (h, *template[1:])
    if isinstance(template, list):
        return [h, *template[1:]]
    return h


@contextlib.contextmanager
def _forwards_replaced(blocks: list[nn.Module], fn: Callable[[int, tuple, dict], Any]) -> Iterator[None]:
    """Temporarily replace ``blocks[i].forward`` by ``fn(i, args, kwargs)`` (hooks keep working)."""
    def make(i: int) -> Callable[..., Any]:
        return lambda *a, **kw: fn(i, a, kw)

    for i, b in enumerate(blocks):
        b.forward = make(i)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for b in blocks:
            with contextlib.suppress(AttributeError):
                del b.forward


@contextlib.contextmanager
def _stoppable(model: nn.Module) -> Iterator[None]:
    """While active, a :class:`_Stop` raised inside ``model.forward`` ends it as a return of ``None``."""
    orig = model.forward

    def forward(*a, **kw):
        try:
            return orig(*a, **kw)
        except _Stop:
            return None

    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        try:
            del model.forward
        except AttributeError:
            model.forward = orig  # type: ignore[method-assign]


# -- the runner -----------------------------------------------------------------------------------------


@dataclass
class BlockStream:
    """The hidden states around the block being processed in :meth:`BlockRunner.walk`.

    ``inputs``/``outputs``: the walked (with ``sequential``: compressed) model's inputs of the
    block and the block's outputs before ``process`` changed it. ``teacher_inputs`` /
    ``teacher_outputs``: the dense model's (the same stores when no dense teacher stream is walked).
    """

    inputs: HiddenStore
    outputs: HiddenStore
    teacher_inputs: HiddenStore
    teacher_outputs: HiddenStore


def _default_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


class BlockRunner:
    """Walks calibration data through ``blocks`` one block at a time.

    ``loop``: the ``forward_loop(model)`` whose calls are captured (one call of the model = one
    batch). ``device``: where blocks run (default: where the model's first real parameter is).
    ``load(i, block)`` / ``release(i, block)``: materialise block ``i`` on the device and put it
    back (default: move it to ``device`` and back to where it was). ``spill_bytes``: RAM for hidden
    states before they spill to a temporary folder on disk.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Blocks,
        loop: Callable[[nn.Module], Any] | None,
        device: torch.device | None = None,
        load: Callable[[int, nn.Module], None] | None = None,
        release: Callable[[int, nn.Module], None] | None = None,
        spill_bytes: int = SPILL_BYTES,
        progress: bool = True,
    ) -> None:
        self.model, self.blocks, self.loop = model, blocks, loop
        self.device = device if device is not None else _default_device(model)
        self._load, self._release = load, release
        self._budget = [int(spill_bytes)]
        self._tmp: Path | None = None
        self.progress = progress
        self.calls: list[list[tuple[tuple, dict]]] | None = None  # [block][batch] -> (args, kwargs)
        self.h0: HiddenStore | None = None
        self._template: Any = None
        self.loaded: set[int] = set()  # blocks materialised right now (tests count them)
        self.stream: BlockStream | None = None  # set during a walk's process(i, block)
        self.max_loaded = 0

    # -- resources --
    def _spill_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="rankwise-hidden-"))
        return self._tmp

    def store(self) -> HiddenStore:
        """An empty :class:`HiddenStore` sharing this runner's RAM budget."""
        return HiddenStore(self._spill_dir, self._budget)

    def close(self) -> None:
        """Drop captured calls and hidden states and remove the spill folder."""
        if self.h0 is not None:
            self.h0.free()
        self.calls, self.h0 = None, None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> BlockRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block ``i`` materialised on the work device for the duration of the ``with``."""
        mod = self.blocks.modules[i]
        home = self.device
        if self._load is not None:
            self._load(i, mod)
        else:
            home = next((p.device for p in mod.parameters()), self.device)
            if home != self.device:
                mod.to(self.device)
        self.loaded.add(i)
        self.max_loaded = max(self.max_loaded, len(self.loaded))
        try:
            yield self.blocks.modules[i]
        finally:
            self.loaded.discard(i)
            if self._release is not None:
                self._release(i, self.blocks.modules[i])
            elif home != self.device:
                self.blocks.modules[i].to(home)
            if self.device.type == "cpu":
                heap.trim()  # the block's freed memory back to the OS, so the peak does not grow with depth

    # -- capture --
    def capture(self) -> None:
        """Run the loop once, recording the (args, kwargs) every block receives; no block is computed.

        Block 0 is materialised for the first call only, to learn what a block returns (a tensor or
        a tuple) so the recorders can pass the hidden state through in the same structure.
        """
        if self.loop is None:
            raise ValueError("this runner has no forward loop to capture")
        n = len(self.blocks.modules)
        calls: list[list[tuple[tuple, dict]]] = [[] for _ in range(n)]
        h0 = self.store()
        memo: dict[int, Any] = {}

        def record(i: int, args: tuple, kwargs: dict) -> Any:
            h = _hidden_of(args, kwargs)
            a, kw = _detach(args, memo), _detach(kwargs, memo)
            if args and isinstance(args[0], torch.Tensor):
                a = (_HIDDEN, *a[1:])  # the hidden state itself comes from the walk
            else:
                kw = {**kw, "hidden_states": _HIDDEN}
            calls[i].append((a, kw))
            if i == 0:
                h0.append(h)
                if self._template is None:
                    with torch.no_grad(), self.block(0) as b:
                        ca, ckw = _call_args(args, kwargs, h)
                        self._template = type(b).forward(b, *ca, **ckw)
            if i == n - 1:
                raise _Stop
            return _like(self._template, h)

        with torch.no_grad(), _forwards_replaced(self.blocks.modules, record), _stoppable(self.model):
            self.loop(self.model)
        if not calls[0]:
            raise RankwiseError("the forward loop never reached the model's blocks; check the calibration data.")
        if any(len(c) != len(calls[0]) for c in calls):
            raise RankwiseError("the forward loop did not run every block on every batch; check the calibration data.")
        if isinstance(self._template, tuple):
            self._template = tuple(None if isinstance(x, torch.Tensor) else x for x in self._template)
        elif isinstance(self._template, torch.Tensor):
            self._template = None
        self.calls, self.h0 = calls, h0

    @property
    def n_batches(self) -> int:
        return 0 if self.calls is None else len(self.calls[0])

    def _to_device(self, obj: Any, memo: dict[int, Any]) -> Any:
        key = id(obj)
        if key in memo:
            return memo[key][1]
        if isinstance(obj, torch.Tensor):
            out: Any = obj.to(self.device)
        elif isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            out = tuple(self._to_device(o, memo) for o in obj)
        elif isinstance(obj, list):
            out = [self._to_device(o, memo) for o in obj]
        elif isinstance(obj, dict):
            out = {k: self._to_device(v, memo) for k, v in obj.items()}
        else:
            out = obj
        memo[key] = (obj, out)
        return out

    def forward_block(self, i: int, block: nn.Module, b: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``i`` on batch ``b`` with hidden state ``h`` (on the device); returns its hidden state."""
        if self.calls is None:
            raise RuntimeError("rankwise bug: forward_block before capture()")
        args, kwargs = self.calls[i][b]
        a, kw = _call_args(self._to_device(args, {}), self._to_device(kwargs, {}), h.to(self.device))
        return block_output(block(*a, **kw))

    @torch.no_grad()
    def run(self, i: int, block: nn.Module, hiddens: HiddenStore) -> HiddenStore:
        """Block ``i`` on every batch; the outputs go to a new store on the CPU."""
        out = self.store()
        for b in range(len(hiddens)):
            out.append(self.forward_block(i, block, b, hiddens[b]))
        return out

    # -- walks --
    def walk(
        self,
        process: Callable[[int, nn.Module], bool],
        *,
        collect: Callable[[int], contextlib.AbstractContextManager] | None = None,
        sequential: bool = False,
        with_data: bool = True,
        desc: str = "blocks",
        teacher: bool = False,
        pair: Callable[[int], Any] | None = None,
    ) -> None:
        """Visit every block in order, materialised.

        With data, block ``i`` runs on its inputs inside ``collect(i)`` (e.g. a statistics
        collector), then ``process(i, block)`` is called; it returns True when it changed the
        block, and with ``sequential`` the block is then run again so the next block sees the
        changed block's outputs. Without data, ``process`` is just called on each block.

        During ``process`` :attr:`stream` holds the block's inputs and outputs (a
        :class:`BlockStream`). ``teacher`` (with ``sequential``): also walk the *dense* model
        beside the compressed one: each block, before ``process`` changes it, runs on the dense
        stream's hidden states too, so ``stream.teacher_outputs`` are the dense model's outputs of
        the block at the same token positions. ``pair(i)`` (with ``teacher``) returns an object
        whose ``dense()`` and ``paired()`` context managers wrap, batch by batch, the block's run on
        the dense stream and then on the compressed stream (cross statistics: see
        :class:`rankwise.compression.anchor.CrossCollector`); ``collect(i)`` is then entered once per
        batch (a :class:`StatsCollector` can be). Where both streams still coincide (block 0) the
        block runs once and ``pair`` is not called.
        """
        hiddens: HiddenStore | None = None
        dense: HiddenStore | None = None
        if with_data:
            if self.calls is None:
                self.capture()
            hiddens = self.h0
            dense = self.h0 if teacher and sequential else None
        with progress_bar(len(self.blocks.modules), desc=desc, unit="block", enabled=self.progress) as bar:
            for i in range(len(self.blocks.modules)):
                with self.block(i) as block:
                    if hiddens is None:
                        process(i, block)
                    else:
                        if dense is not None and dense is not hiddens:
                            outs, touts = self._run_pair(i, block, hiddens, dense, collect, pair)
                        else:
                            ctx = collect(i) if collect is not None else contextlib.nullcontext()
                            with ctx:
                                outs = self.run(i, block, hiddens)
                            touts = outs
                        self.stream = BlockStream(inputs=hiddens, outputs=outs, teacher_outputs=touts,
                                                  teacher_inputs=dense if dense is not None else hiddens)
                        try:
                            changed = process(i, block)
                        finally:
                            self.stream = None
                        if sequential and changed and i + 1 < len(self.blocks.modules):
                            if touts is not outs or dense is None:
                                outs.free()
                            outs = self.run(i, block, hiddens)
                        for old in {id(s): s for s in (hiddens, dense) if s is not None}.values():
                            if old is not self.h0:
                                old.free()
                        hiddens = outs
                        dense = touts if dense is not None else None
                bar.update(1)
        for old in {id(s): s for s in (hiddens, dense) if s is not None}.values():
            if old is not self.h0:
                old.free()

    @torch.no_grad()
    def _run_pair(self, i: int, block: nn.Module, hiddens: HiddenStore, dense: HiddenStore,
                  collect: Callable[[int], contextlib.AbstractContextManager] | None,
                  pair: Callable[[int], Any] | None) -> tuple[HiddenStore, HiddenStore]:
        """Block ``i`` on the dense and on the compressed stream, batch by batch; (outputs, dense outputs)."""
        outs, touts = self.store(), self.store()
        col = collect(i) if collect is not None else None
        pr = pair(i) if pair is not None else None
        for b in range(len(hiddens)):
            with pr.dense() if pr is not None else contextlib.nullcontext():
                touts.append(self.forward_block(i, block, b, dense[b]))
            with col if col is not None else contextlib.nullcontext(), (
                    pr.paired() if pr is not None else contextlib.nullcontext()):
                outs.append(self.forward_block(i, block, b, hiddens[b]))
        return outs, touts

    def backward(
        self,
        head_loss: Callable[[int, torch.Tensor], torch.Tensor],
        collect: Callable[[int], contextlib.AbstractContextManager] | None = None,
        desc: str = "loss backward",
    ) -> None:
        """Stream a loss backward through the blocks (block-granularity checkpointing).

        Forward: block by block, keeping each block's input for every batch (CPU, spilled past
        the budget). Head: ``head_loss(b, h_top)`` returns the loss of batch ``b`` from the top
        hidden state (the caller runs the model's head on it). Backward: from the top block down,
        recompute the block from its stored input with gradients on, backpropagate the upstream
        gradient inside ``collect(i)`` (hooks that read output or weight gradients) and pass the
        input gradient down. Parameters keep their ``requires_grad`` flags: freeze what should
        not get gradients.
        """
        if self.calls is None:
            self.capture()
        if self.h0 is None:
            raise RuntimeError("rankwise bug: capture() left no block inputs")
        n = len(self.blocks.modules)
        inputs: list[HiddenStore] = [self.h0]
        with progress_bar(2 * n, desc=desc, unit="block", enabled=self.progress) as bar:
            for i in range(n):
                with self.block(i) as block:
                    inputs.append(self.run(i, block, inputs[-1]))
                bar.update(1)
            grads = self.store()
            for b in range(len(inputs[-1])):
                h = inputs[-1][b].to(self.device).requires_grad_(True)
                with torch.enable_grad():
                    loss = head_loss(b, h)
                    (g,) = torch.autograd.grad(loss, h)
                grads.append(g)
            inputs.pop().free()
            for i in reversed(range(n)):
                new = self.store()
                with self.block(i) as block:
                    ctx = collect(i) if collect is not None else contextlib.nullcontext()
                    with ctx:
                        for b in range(len(grads)):
                            h = inputs[i][b].to(self.device).requires_grad_(True)
                            with torch.enable_grad():
                                out = self.forward_block(i, block, b, h)
                                out.backward(grads[b].to(self.device, out.dtype))
                            new.append(h.grad)
                grads.free()
                grads = new
                if i > 0:
                    inputs.pop().free()
                bar.update(1)
            grads.free()

    def head_pass(self, fn: Callable[[], Any], h_top: torch.Tensor) -> Any:
        """Run ``fn()`` (a model forward) with every block passed through and the last one returning ``h_top``.

        Only the embeddings and the head compute: the loss of a hidden state at the top of the blocks.
        """
        n = len(self.blocks.modules)

        def passthrough(i: int, args: tuple, kwargs: dict) -> Any:
            return _like(self._template, h_top if i == n - 1 else _hidden_of(args, kwargs))

        with _forwards_replaced(self.blocks.modules, passthrough):
            return fn()

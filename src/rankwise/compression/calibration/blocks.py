"""Sequential (block-by-block) calibration without knowing the model family.

The repeated blocks of a network are found structurally: the longest
``nn.ModuleList`` whose children contain target layers (Llama's ``model.layers``,
GPT-2's ``transformer.h``, BERT's ``encoder.layer``). The inputs of block 0 are
captured by a forward pre-hook that records (args, kwargs) and stops the forward
pass, so the rest of the network never runs. Each block is then run on the
stored inputs one at a time; only one block's inputs and outputs are in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankwise.surgery.targets import Target


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass early."""


@dataclass
class Blocks:
    """The repeated blocks: their container name, the modules, and each target's block index."""

    prefix: str
    modules: list[nn.Module]
    index_of: dict[str, int]  # target name -> block index (targets outside blocks are absent)


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
    mlist = model.get_submodule(prefix)
    return Blocks(prefix=prefix, modules=list(mlist), index_of=index_of)


def capture_block_inputs(model: nn.Module, block: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> list:
    """Run ``forward_loop`` but stop each forward at ``block``; return the (args, kwargs) it received.

    ``model.forward`` is wrapped while capturing so the early stop looks like a
    normal return (of ``None``) to the loop; the loop should not use the outputs.
    """
    captured: list[tuple[tuple, dict]] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
        captured.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))
        raise _StopForward

    orig_forward = model.forward

    def forward(*a, **kw):
        try:
            return orig_forward(*a, **kw)
        except _StopForward:
            return None

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.forward = forward  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            forward_loop(model)
    finally:
        handle.remove()
        try:
            del model.forward
        except AttributeError:
            model.forward = orig_forward  # type: ignore[method-assign]
    return captured


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    kwargs = dict(kwargs)
    for key in ("past_key_values", "past_key_value", "layer_past", "cache"):  # "cache": transformers >= 5.24
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    if args and isinstance(args[0], torch.Tensor):
        return (h, *args[1:]), kwargs
    kwargs["hidden_states"] = h
    return args, kwargs


@torch.no_grad()
def run_block(block: nn.Module, inputs: list, hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``block`` on every stored call, with the hidden states replaced by ``hiddens``."""
    outs = []
    for (args, kwargs), h in zip(inputs, hiddens):
        a, kw = _with_hidden(args, kwargs, h)
        out = block(*a, **kw)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif not isinstance(out, torch.Tensor) and hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        outs.append(out.detach())
    return outs


def initial_hiddens(inputs: list) -> list[torch.Tensor]:
    """The hidden-state tensor of each captured call."""
    return [_hidden(a, kw) for a, kw in inputs]

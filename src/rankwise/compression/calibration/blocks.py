"""Block-0 capture helpers kept for callers not yet on :class:`rankwise.compression.runner.BlockRunner`.

Deprecated: these reuse block 0's keyword arguments for every block, which is wrong for
models whose layers get different attention masks (sliding-window and global layers). Use
:class:`rankwise.compression.runner.BlockRunner`, which captures each block's own arguments.
``Blocks`` and ``find_blocks`` live in the runner and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankwise.compression.runner import Blocks, find_blocks

__all__ = ["Blocks", "capture_block_inputs", "find_blocks", "initial_hiddens", "run_block"]


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass early."""


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

"""Block refinement: a few Adam steps on one factorised block's factors, matching the dense block's outputs.

After block ℓ is factorised, its ``LowRankLinear`` factors (``A.weight``, ``B.weight``; biases,
norms and any dense layer stay frozen) are trained to reproduce the *dense* model's output of
the block on the calibration windows:

    L = ‖f_c(h_c) − f_d(h_d)‖² / ‖f_d(h_d) − h_d‖²

f_c the factorised block on the inputs the compressed model feeds it (with sequential
calibration; otherwise the dense inputs), f_d the dense block on the dense model's inputs (the
runner's teacher stream); the denominator, what the dense block adds to its input, makes L a
relative error of the block's own contribution (the residual stream would otherwise dwarf it and
leave Adam's steps at the scale of its ε). The calibration batches are split: the last ``holdout`` fraction of
them is held out; the held-out loss is measured before the first step and after every pass over
the training batches (and at the end), training stops after ``patience`` measurements without a
new best, and the best state by held-out loss is put back. So the block never ends worse than
it started on the held-out slice (equal at worst, measured in float32).

Memory is one block: the block (a float32 copy when stored in another dtype; bf16 matmuls and
backward are emulated on CPUs without native bf16), its factors' Adam moments and one batch of
activations. Under ``torch.distributed`` each process runs its own windows; the gradients and the
held-out sums are averaged over the processes, so every process takes the same steps.

Hand-written rather than a ``transformers.Trainer``: the "model" is one block called with the
captured per-batch arguments of the runner, the targets are hidden states from the teacher
stream, and the loop needs early stopping on a held-out slice with a best-state rollback.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.surgery.lowrank import LowRankLinear


@dataclass
class RefineInfo:
    """What the refinement of one block did (held-out losses are relative squared errors)."""

    start: float
    best: float
    steps: int
    best_step: int
    train_batches: int
    holdout_batches: int

    def to_dict(self) -> dict:
        return asdict(self)


def factor_parameters(block: nn.Module) -> list[nn.Parameter]:
    """``A.weight`` and ``B.weight`` of every :class:`LowRankLinear` in ``block``, in module order."""
    out = []
    for mod in block.modules():
        if isinstance(mod, LowRankLinear):
            out += [mod.A.weight, mod.B.weight]
    return out


def split_batches(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(training, held-out) batch indices: the last ⌈holdout·n⌉ batches (at least one, leaving one) held out."""
    if n < 2:
        raise RankwiseError(f"block refinement needs at least 2 calibration batches (train + held out), got {n}; "
                            "raise calib_samples or lower batch_size.")
    k = min(max(1, math.ceil(holdout * n)), n - 1)
    return list(range(n - k)), list(range(n - k, n))


def refine_block(runner, i: int, block: nn.Module, *, steps: int, lr: float, holdout: float = 0.25,
                 patience: int = 2, skip_first: int = 0, dist=None) -> RefineInfo | None:
    """Refine the factors of block ``i`` (materialised, inside a :meth:`BlockRunner.walk` ``process``).

    Reads the block's inputs and the dense teacher's outputs from ``runner.stream``. Returns None
    when the block holds no factorised layer.
    """
    stream = runner.stream
    if stream is None:
        raise RuntimeError("rankwise bug: refine_block outside a runner walk")
    params = factor_parameters(block)
    if not params or steps <= 0:
        return None
    train, held = split_batches(len(stream.inputs), holdout)
    dtype = params[0].dtype
    work = block if all(p.dtype == torch.float32 for p in block.parameters()) else copy.deepcopy(block).float()
    wparams = factor_parameters(work)
    flags = [(p, p.requires_grad) for p in work.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in wparams:
        p.requires_grad_(True)

    def sq(b: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖out − target‖², ‖target − dense input‖²) of batch ``b`` over the kept positions."""
        h = stream.inputs[b].to(runner.device, torch.float32)
        with torch.set_grad_enabled(grad):
            out = runner.forward_block(i, work, b, h).float()
        t = stream.teacher_outputs[b].to(out.device, torch.float32)
        delta = t - stream.teacher_inputs[b].to(out.device, torch.float32)  # what the dense block adds
        if skip_first and out.dim() >= 3 and out.shape[-2] > skip_first:
            out, t, delta = out[..., skip_first:, :], t[..., skip_first:, :], delta[..., skip_first:, :]
        return ((out - t) ** 2).sum(), (delta * delta).sum()

    def held_loss() -> float:
        num = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for b in held:
                e, d = sq(b, False)
                num += torch.stack([e.double().cpu(), d.double().cpu()])
        if dist is not None:
            dist.all_reduce_(num)
        return float(num[0] / num[1].clamp_min(1e-30))

    opt = torch.optim.Adam(wparams, lr=lr)
    best_state = [p.detach().clone() for p in wparams]
    start = best = held_loss()
    best_step = since = step = 0
    every = len(train)
    try:
        while step < steps:
            b = train[step % len(train)]
            opt.zero_grad(set_to_none=True)
            e, d = sq(b, True)
            loss = e / d.detach().clamp_min(1e-30)
            if not bool(torch.isfinite(loss)):
                break  # keeps the best (finite) state; the start state at worst
            loss.backward()
            if dist is not None and dist.enabled:
                for p in wparams:
                    dist.all_reduce_(p.grad).div_(dist.world)
            opt.step()
            step += 1
            if step % every == 0 or step == steps:
                cur = held_loss()
                if cur < best:
                    best, best_step, since = cur, step, 0
                    best_state = [p.detach().clone() for p in wparams]
                else:
                    since += 1
                    if since >= patience:
                        break
    finally:
        with torch.no_grad():  # the best state (the start state at worst) into the block's own factors
            for p, src in zip(params, best_state):
                p.copy_(src.to(dtype))
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    return RefineInfo(start=start, best=best, steps=step, best_step=best_step, train_batches=len(train),
                      holdout_batches=len(held))

"""GPTQ (Frantar et al., 2023): quantise a matrix column by column, correcting the rest for each error.

Given the layer's input second moment XᵀX (float64, from rankwise's calibration
statistics — the same matrix whitening uses), the output error ‖(W − Ŵ) Xᵀ‖²_F has
Hessian H = 2 XᵀX in each row of W. GPTQ quantises the columns in order; after column j
it spreads that column's rounding error over the not-yet-quantised columns with the
row j of the upper Cholesky factor U of H⁻¹ (the optimal Optimal-Brain-Surgeon update).

Lazy batch updates (the paper's §"Lazy batch-updates"): the columns are taken in blocks
of ``block_size`` (128). Inside a block each error is spread only over the block's own
remaining columns (one rank-1 update on a block-sized slab, kept in a row-contiguous
transposed layout); the rest of the matrix receives the whole block's errors at once,
in one matrix product ``W[:, rest] -= E · U[block, rest]``. The result is the same as
updating every remaining column after every column (tested against that loop); the
bulk of the arithmetic becomes one matmul per block.

Group parameters (scale, zero point) are chosen when the quantiser reaches a group's
first column, from the already-updated weights, as in the reference implementation.
With ``act_order`` (the reference's ``desc_act`` with ``static_groups``) the columns are
quantised in descending order of diag(H) — the inputs with the most energy first, while
the most other columns are left to absorb their error — and each contiguous group's
parameters are fixed beforehand from the original weights, so the stored layout (groups
of consecutive input columns) is unchanged.

Written here (not taken from a GPU toolkit) because it runs on CPU in float64 on the
statistics rankwise already collects.
"""

from __future__ import annotations

import torch

from rankwise.engine.linalg import inverse_cholesky_upper
from rankwise.errors import RankwiseError
from rankwise.quantization.pack import check_bits
from rankwise.quantization.rtn import QuantizedWeight, group_params, num_groups

__all__ = ["gptq", "gptq_hessian_factor"]


def gptq_hessian_factor(xtx: torch.Tensor, damp: float, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of the damped H⁻¹ (UᵀU = H⁻¹, H = 2XᵀX); dead = inputs never seen."""
    m, n = shape
    H = 2.0 * xtx.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: any value is exact on the data
    H[dead, dead] = 1.0
    diag = torch.diagonal(H)
    diag += damp * float(diag.mean())
    try:
        return inverse_cholesky_upper(H), dead
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise RankwiseError(
            f"GPTQ: the damped Hessian of a {m}×{n} layer is not positive definite ({exc}); raise --damp."
        ) from exc


@torch.no_grad()
def gptq(weight: torch.Tensor, xtx: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False) -> QuantizedWeight:
    """GPTQ codes of an m×n ``weight`` given XᵀX (n×n); ``damp`` × mean(diag H) is added to H's diagonal.

    ``act_order`` quantises the columns in descending order of diag(H) with each group's parameters fixed from
    the original weights (static groups). ``block_size`` is the lazy-update block (rounded up to whole groups
    without ``act_order``); it changes only the order of the arithmetic, not the result.
    """
    check_bits(bits)
    m, n = weight.shape
    if xtx.shape != (n, n):
        raise RankwiseError(f"GPTQ needs XᵀX of shape {(n, n)} for a {m}×{n} weight, got {tuple(xtx.shape)}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise RankwiseError(f"GPTQ block_size must be a positive whole number, got {block_size!r}.")
    dev = xtx.device
    W = weight.detach().to(device=dev, dtype=torch.float64).clone()
    G = num_groups(n, group_size)
    qmax = (1 << bits) - 1
    scales = torch.zeros(G, m, dtype=torch.float64, device=dev)
    zeros = torch.zeros(G, m, dtype=torch.float64, device=dev)
    if act_order:
        H = xtx.to(torch.float64)
        dead = torch.diagonal(H) == 0
        W[:, dead] = 0.0
        for g in range(G):  # static groups: parameters from the original (dead-zeroed) weights
            scales[g], zeros[g] = group_params(W[:, g * group_size:(g + 1) * group_size], bits)
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        U, _ = gptq_hessian_factor(H[perm][:, perm], damp, (m, n))
        group_of = (perm // group_size).tolist()
        Wt = W[:, perm].T.contiguous()  # n×m: the column quantised i-th is row i (contiguous)
    else:
        U, dead = gptq_hessian_factor(xtx, damp, (m, n))
        W[:, dead] = 0.0
        perm = None
        group_of = [j // group_size for j in range(n)]
        block_size = group_size * max(1, -(-block_size // group_size))  # whole groups per block
        Wt = W.T.contiguous()
    codes = torch.zeros(n, m, dtype=torch.float64, device=dev)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Wb = Wt[i1:i2]  # a view: the block's columns of W, already updated for every earlier block
        Ub = U[i1:i2, i1:i2]
        Err = torch.empty_like(Wb)
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if perm is None and col % group_size == 0:
                scales[g], zeros[g] = group_params(Wb[i:i + group_size].T, bits)
            w = Wb[i]
            s, z = scales[g], zeros[g]
            q = (torch.round(w / s) + z).clamp_(0, qmax)
            codes[col] = q
            err = (w - (q - z) * s).div_(Ub[i, i])
            Err[i] = err
            if i + 1 < i2 - i1:  # spread over the block's remaining columns only (lazy for the rest)
                Wb[i + 1:].addr_(Ub[i, i + 1:], err, alpha=-1.0)
        if i2 < n:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err, alpha=-1.0)  # the whole block's errors at once
    if perm is not None:
        codes = codes[torch.argsort(perm)]
    return QuantizedWeight(codes=codes.T.to(torch.uint8).contiguous().cpu(), scales=scales.T.to(torch.float16).cpu(),
                           zeros=zeros.T.to(torch.uint8).contiguous().cpu(), bits=bits, group_size=group_size)

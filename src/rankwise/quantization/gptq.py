"""GPTQ (Frantar et al., 2023): quantise a matrix column by column, correcting the rest for each error.

Given the layer's input second moment XᵀX (float64, from rankwise's calibration
statistics — the same matrix whitening uses), the output error ‖(W − Ŵ) Xᵀ‖²_F has
Hessian H = 2 XᵀX in each row of W. GPTQ quantises the columns in order; after column j
it spreads that column's rounding error over the not-yet-quantised columns with the
row j of the upper Cholesky factor U of H⁻¹ (the optimal Optimal-Brain-Surgeon update),
in blocks of columns with lazy updates of the rest. Group parameters (scale, zero
point) are chosen when the quantiser reaches a group's first column, from the
already-updated weights, as in the reference implementation.

Written here (not taken from a GPU toolkit) because it runs on CPU in float64 on the
statistics rankwise already collects.
"""

from __future__ import annotations

import torch

from rankwise.engine.linalg import inverse_cholesky_upper
from rankwise.errors import RankwiseError
from rankwise.quantization.pack import check_bits
from rankwise.quantization.rtn import QuantizedWeight, group_params, num_groups, quantize_codes

__all__ = ["gptq"]


@torch.no_grad()
def gptq(weight: torch.Tensor, xtx: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         block_size: int = 128) -> QuantizedWeight:
    """GPTQ codes of an m×n ``weight`` given XᵀX (n×n); ``damp`` × mean(diag H) is added to H's diagonal."""
    check_bits(bits)
    m, n = weight.shape
    if xtx.shape != (n, n):
        raise RankwiseError(f"GPTQ needs XᵀX of shape {(n, n)} for a {m}×{n} weight, got {tuple(xtx.shape)}.")
    W = weight.detach().to(device=xtx.device, dtype=torch.float64).clone()
    H = 2.0 * xtx.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0  # inputs that were always zero: any value is exact on the data
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag = torch.diagonal(H)
    diag += damp * float(diag.mean())
    try:
        U = inverse_cholesky_upper(H)  # UᵀU = H⁻¹
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise RankwiseError(
            f"GPTQ: the damped Hessian of a {m}×{n} layer is not positive definite ({exc}); raise --damp."
        ) from exc
    G = num_groups(n, group_size)
    codes = torch.zeros(m, n, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(m, G, dtype=torch.float64, device=W.device)
    zeros = torch.zeros(m, G, dtype=torch.float64, device=W.device)
    block = group_size * max(1, -(-block_size // group_size))  # whole groups per block
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // group_size
            if col % group_size == 0:
                scales[:, gi], zeros[:, gi] = group_params(W1[:, i : i + min(group_size, n - col)], bits)
            w = W1[:, i]
            q = quantize_codes(w, scales[:, gi], zeros[:, gi], bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w - (q - zeros[:, gi]) * scales[:, gi]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return QuantizedWeight(codes=codes.cpu(), scales=scales.to(torch.float16).cpu(), zeros=zeros.to(torch.uint8).cpu(),
                           bits=bits, group_size=group_size)

"""Asymmetric per-group integer quantisation: parameters and round-to-nearest (RTN).

A weight matrix W (out×in) is cut along each row into groups of ``group_size``
consecutive input columns (the last group may be shorter when ``group_size`` does not
divide the row; rankwise only allows that for the rank dimension of low-rank factors).
Each group g gets a scale s and an integer zero point z in [0, 2^b − 1] from its range,
widened to contain 0 (the GPTQ convention, so 0 is exactly representable):

    lo = min(min W_g, 0),  hi = max(max W_g, 0),  s = (hi − lo) / (2^b − 1),
    z = clamp(round(−lo / s), 0, 2^b − 1),  q = clamp(round(w / s) + z, 0, 2^b − 1),
    ŵ = (q − z) · s.

Scales are rounded to float16 *before* the codes are computed, so what is stored
(float16 scales, b-bit codes and zero points) dequantises to exactly the ŵ the
quantiser produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.quantization.pack import check_bits

__all__ = ["QuantizedWeight", "group_params", "num_groups", "quantize_codes", "rtn"]

_F16_TINY = float(torch.finfo(torch.float16).tiny)
_F16_MAX = float(torch.finfo(torch.float16).max)


def num_groups(n: int, group_size: int) -> int:
    """Groups per row of ``n`` columns."""
    return -(-n // group_size)


@dataclass
class QuantizedWeight:
    """Integer codes (m×n, uint8), float16 scales and uint8 zero points (m×groups) of one matrix."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ŵ = (q − z) · s as an m×n matrix."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q − z) · s per group, computed in float32 (exact: |q − z| ≤ 255 and s is float16) and cast to ``dtype``."""
    n = codes.shape[1]
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :n]
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)[:, :n]
    return ((codes.to(torch.float32) - z) * s).to(dtype)


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-representable, returned as w's dtype) and integer zero point of each row of ``w`` (…×g).

    Returns tensors of shape ``w.shape[:-1]``.
    """
    qmax = (1 << bits) - 1
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    scale = scale.clamp(_F16_TINY, _F16_MAX).to(torch.float16).to(w.dtype)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes q = clamp(round(w / s) + z, 0, 2^b − 1) (float tensor of w's dtype; broadcasting)."""
    return (torch.round(w / scale) + zero).clamp(0, (1 << bits) - 1)


@torch.no_grad()
def rtn(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest quantisation of an m×n matrix with per-group asymmetric parameters."""
    check_bits(bits)
    m, n = weight.shape
    G = num_groups(n, group_size)
    w = weight.detach().to(torch.float64)
    pad = G * group_size - n
    if pad:  # shorter last group: pad with copies of the row's last value (does not widen its range)
        w = torch.cat([w, w[:, -1:].expand(m, pad)], dim=1)
    wg = w.reshape(m, G, group_size)
    scale, zero = group_params(wg, bits)
    q = quantize_codes(wg, scale[..., None], zero[..., None], bits).reshape(m, -1)[:, :n]
    return QuantizedWeight(
        codes=q.to(torch.uint8), scales=scale.to(torch.float16), zeros=zero.to(torch.uint8), bits=bits,
        group_size=group_size,
    )

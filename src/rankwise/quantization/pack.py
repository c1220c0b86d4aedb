"""Bit packing of unsigned integer codes into bytes (2, 3, 4 and 8 bits per value).

Eight consecutive codes of ``bits`` bits make one ``8·bits``-bit integer, little-endian
(code j occupies bits ``j·bits … (j+1)·bits − 1``), written as ``bits`` bytes. The same
rule serves every width, including 3 bits (8 codes → 3 bytes), so a tensor of N codes
takes exactly ``ceil(N / 8) · bits`` bytes (N bytes at 8 bits). Written by hand because safetensors stores
bytes, not sub-byte types, and no maintained library packs 3-bit codes on CPU.
"""

from __future__ import annotations

import torch

from rankwise.errors import RankwiseError

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)

__all__ = ["SUPPORTED_BITS", "check_bits", "pack", "packed_size", "unpack"]


def check_bits(bits: object) -> int:
    """``bits`` if it is a supported width, else a one-line error."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise RankwiseError(
            f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}."
        )
    return bits


def packed_size(numel: int, bits: int) -> int:
    """Bytes that :func:`pack` writes for ``numel`` codes (8 bits: one byte each, no padding)."""
    return numel if bits == 8 else -(-numel // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` (any shape, flattened row-major) into a 1-D uint8 tensor."""
    check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise RankwiseError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits.")
    if bits == 8:
        return flat.to(torch.uint8).clone()
    pad = (-flat.numel()) % 8
    v = torch.nn.functional.pad(flat.to(torch.int64), (0, pad)).reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=v.device) * bits
    word = (v << shifts).sum(dim=1)  # ≤ 24 bits, exact in int64
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=v.device) * 8
    return ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a 1-D uint8 tensor."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel, bits):
        raise RankwiseError(
            f"packed data must be {packed_size(numel, bits)} uint8 bytes for {numel} codes at {bits} bits, "
            f"got {tuple(packed.shape)} {packed.dtype}; the checkpoint is inconsistent."
        )
    if bits == 8:
        return packed.clone()
    b = packed.reshape(-1, bits).to(torch.int32)
    byte_shifts = torch.arange(bits, dtype=torch.int32, device=b.device) * 8
    word = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int32, device=b.device) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)

"""Factors kept on disk between the spectra pass and the factorisation pass.

The default pipeline needs every matrix's spectrum before it can allocate ranks, and then the
factors at the allocated ranks. Without this store the factorisation pass walks the calibration
data again and repeats every decomposition (measured: two thirds of a streamed compress's time).
A truncated SVD is a prefix of a longer one (B = the first k columns, A = the first k rows), so the
spectra pass keeps each matrix's factors up to the highest rank any allocator may give it (one below
its break-even rank, so they take fewer bytes than the float32 weight) and the factorisation pass
only slices them. They go to a temporary folder on disk, one safetensors file per matrix, so the
memory of a streamed compress stays one block's worth whatever the depth.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rankwise.engine.metrics import break_even_rank


class FactorStore:
    """``put(name, B, A)`` float32 factors up to the cap rank; ``get(name, k)`` their rank-k prefix."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="rankwise-factors-", dir=root)
        self.path = Path(self._dir.name)
        self._files: dict[str, Path] = {}
        self.bytes = 0

    @staticmethod
    def cap(m: int, n: int) -> int:
        """The highest rank an allocator may give an m×n matrix (one below break-even)."""
        return min(m, n, break_even_rank(m, n) - 1)

    @classmethod
    def fits(cls, shapes: list[tuple[int, int]], root: str | Path | None = None, share: float = 0.5) -> bool:
        """Whether the factors of matrices of these shapes fit in ``share`` of the free space of the temporary
        folder (else the pipeline recomputes them in a second pass: 70B models would need ~270 GB here)."""
        import shutil

        need = sum(4 * cls.cap(m, n) * (m + n) for m, n in shapes)
        free = shutil.disk_usage(root or tempfile.gettempdir()).free
        return need <= share * free

    def put(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        f = self.path / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + f".{len(self._files)}.safetensors")
        tensors = {"B": B.detach().to(torch.float32).cpu().contiguous(),
                   "A": A.detach().to(torch.float32).cpu().contiguous()}
        save_file(tensors, str(f))
        self._files[name] = f
        self.bytes += sum(t.numel() * 4 for t in tensors.values())

    def get(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = load_file(str(self._files[name]))
        if k > t["A"].shape[0]:
            raise RuntimeError(f"rankwise bug: rank {k} for {name} above the stored cap {t['A'].shape[0]}")
        return t["B"][:, :k].contiguous(), t["A"][:k].contiguous()

    def close(self) -> None:
        self._dir.cleanup()
        self._files.clear()

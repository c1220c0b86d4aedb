"""The one peak-memory sampler of rankwise (eval's speed runs, tune's and train's loops, benchmarks).

``with PeakMemory(device) as pm: ...`` records the peak while its block runs:

* CPU: the process resident set size (RSS, via psutil), sampled by a background
  thread every ``interval_s`` (default 5 ms) and once more at exit. Process-wide:
  it includes every model the process holds. ``extra_mb`` is the increase over the
  RSS at entry, i.e. what the block itself added at its peak.
* CUDA: ``torch.cuda.max_memory_allocated`` on ``device`` (peak statistics reset at
  entry); ``extra_mb`` is the peak above what was allocated at entry.

Attributes after the block: ``peak_mb``, ``extra_mb`` (alias ``delta_mb``), ``peak_bytes``,
``start_bytes``, ``kind`` (``"rss"`` or ``"cuda_max_allocated"``).
"""

from __future__ import annotations

import threading
from typing import Any


class PeakMemory:
    """Context manager recording peak memory (RSS on CPU, allocated bytes on CUDA) while its block runs."""

    def __init__(self, device: Any = "cpu", interval_s: float = 0.005) -> None:
        self.device = str(device)
        self.interval_s = float(interval_s)
        self.kind = "cuda_max_allocated" if self.device.startswith("cuda") else "rss"
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.kind == "rss":
            import psutil

            self._proc = psutil.Process()
            self.start_bytes = self.peak_bytes = self._proc.memory_info().rss
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True, name="rankwise-peak-rss")
            self._thread.start()
        else:
            import torch

            torch.cuda.synchronize(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_bytes = self.start_bytes
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self.kind == "rss":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
        else:
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))

    @property
    def peak_mb(self) -> float:
        """Highest memory seen, MiB."""
        return self.peak_bytes / 2**20

    @property
    def extra_mb(self) -> float:
        """Peak above the memory at entry, MiB (what the block added at its peak)."""
        return max(0, self.peak_bytes - self.start_bytes) / 2**20

    delta_mb = extra_mb  # the name tune's trainer used


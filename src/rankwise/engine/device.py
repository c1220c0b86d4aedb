"""Where and in what precision work runs: ``--device`` and ``--dtype`` checked once, resolved once.

``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: ``auto`` (the checkpoint's own dtype), ``bfloat16``, ``float16``, ``float32``
(short forms bf16, fp16, half, fp32, float accepted).
Second-moment statistics, whitening and Cholesky stay float64; :func:`stats_device`
says where (on the device when it runs float64 well, else on the CPU).

:func:`check_device` / :func:`check_dtype` validate the spelling without importing torch,
so config dataclasses use them in ``__post_init__`` and as CLI option types (``--help``
stays cheap); :func:`resolve_device` / :func:`resolve_dtype` turn them into torch objects
when the work starts.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from rankwise.errors import RankwiseError

if TYPE_CHECKING:
    import torch

DEVICES_HELP = "auto|cpu|cuda|cuda:N"
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def check_device(value: Any) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (lower-cased), else a one-line error; imports no torch.

    Whether the device exists is checked by :func:`resolve_device` when the work starts.
    """
    if type(value).__name__ == "device":  # a torch.device given through the Python API
        value = str(value)
    d = value.strip().lower() if isinstance(value, str) else ""
    if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
        raise RankwiseError(f"unknown device {value!r}; use auto, cpu, cuda or cuda:N.")
    return d


def check_dtype(value: Any) -> Any:
    """A dtype name (``DTYPE_CHOICES`` or a short form, canonicalised) or a ``torch.dtype``; imports no torch."""
    if type(value).__name__ == "dtype":  # a torch.dtype given through the Python API
        return value
    d = value.strip().lower().removeprefix("torch.") if isinstance(value, str) else None
    d = DTYPE_ALIASES.get(d, d) if d is not None else None
    if d not in DTYPE_CHOICES:
        raise RankwiseError(f"unknown dtype {value!r}; use one of {', '.join(DTYPE_CHOICES)}.")
    return d


@functools.cache
def _dtypes() -> dict[str, torch.dtype | None]:
    import torch

    table: dict[str, torch.dtype | None] = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                            "float32": torch.float32}
    table.update({alias: table[name] for alias, name in DTYPE_ALIASES.items()})
    return table


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # name → torch dtype (None for auto); built on first use so importing stays torch-free
        return _dtypes()
    raise AttributeError(f"module 'rankwise.engine.device' has no attribute {name!r}")


def _available() -> str:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "cpu" + (f", cuda:0..cuda:{n - 1}" if n else " only (no CUDA device is visible)")


def resolve_device(spec: Any = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` → a usable :class:`torch.device`, or a one-line error."""
    import torch

    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) and spec is not None:
        raise RankwiseError(f"unknown --device {spec!r}; use {DEVICES_HELP}.")
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RankwiseError(f"--device {spec} asked for CUDA but this machine has {_available()}; "
                                "use --device cpu or auto.")
        if ":" in s:
            idx = s.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise RankwiseError(f"--device {spec} does not exist; available: {_available()}.")
        return torch.device(s)
    raise RankwiseError(f"unknown --device {spec!r}; use {DEVICES_HELP}.")


def resolve_dtype(spec: Any, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """``auto`` → the checkpoint's dtype (float32 when unknown); a name → that dtype; else a one-line error."""
    import torch

    if isinstance(spec, torch.dtype):
        dt: torch.dtype | None = spec
    else:
        key = (spec or "auto").strip().lower().removeprefix("torch.") if isinstance(spec, str) or spec is None else ""
        if key not in _dtypes():
            raise RankwiseError(f"unknown --dtype {spec!r}; use one of {', '.join(DTYPE_CHOICES)}.")
        dt = _dtypes()[key]
    if dt is None:
        dt = checkpoint_dtype or torch.float32
    if dt not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise RankwiseError(f"--dtype {dt} is not a floating-point weight dtype; "
                            f"use one of {', '.join(DTYPE_CHOICES)}.")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (as written in config.json and rankwise.json)."""
    return str(dt).removeprefix("torch.")


def config_dtype(config: Any) -> torch.dtype | None:
    """The dtype a transformers config declares (``dtype`` or legacy ``torch_dtype``), if any."""
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _dtypes():
        return _dtypes()[value.removeprefix("torch.")]
    return None


def stats_device(device: torch.device) -> torch.device:
    """Where float64 statistics and decompositions run: the device if it does float64 well, else CPU.

    Data-centre GPUs (compute capability 6.0 / 7.0 / 8.0 / 9.0 / 10.0: P100, V100, A100, H100/H200,
    B200) have fast float64; consumer GPUs run it at 1/32–1/64 of float32 speed, so their float64
    work goes to the CPU.
    """
    import torch

    if device.type != "cuda":
        return torch.device("cpu")
    major, minor = torch.cuda.get_device_capability(device)
    return device if (major, minor) in ((6, 0), (7, 0), (8, 0), (9, 0), (10, 0)) else torch.device("cpu")

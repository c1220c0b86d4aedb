"""Where and in what precision work runs: ``--device`` and ``--dtype`` resolved once.

``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: ``auto`` (the checkpoint's own dtype), ``bfloat16``, ``float16``, ``float32``.
Second-moment statistics, whitening and Cholesky stay float64; :func:`stats_device`
says where (on the device when it runs float64 well, else on the CPU).
"""

from __future__ import annotations

import torch

from rankwise.errors import RankwiseError

DEVICES_HELP = "auto|cpu|cuda|cuda:N"
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


def _available() -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "cpu" + (f", cuda:0..cuda:{n - 1}" if n else " only (no CUDA device is visible)")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` → a usable :class:`torch.device`, or a one-line error."""
    if isinstance(spec, torch.device):
        spec = str(spec)
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


def resolve_dtype(spec: str | torch.dtype | None, checkpoint_dtype: torch.dtype | None = None) -> torch.dtype:
    """``auto`` → the checkpoint's dtype (float32 when unknown); a name → that dtype; else a one-line error."""
    if isinstance(spec, torch.dtype):
        dt: torch.dtype | None = spec
    else:
        key = (spec or "auto").strip().lower().removeprefix("torch.")
        if key not in DTYPES:
            raise RankwiseError(f"unknown --dtype {spec!r}; use one of {', '.join(DTYPE_CHOICES)}.")
        dt = DTYPES[key]
    if dt is None:
        dt = checkpoint_dtype or torch.float32
    if dt not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise RankwiseError(f"--dtype {dt} is not a floating-point weight dtype; "
                            f"use one of {', '.join(DTYPE_CHOICES)}.")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (as written in config.json and rankwise.json)."""
    return str(dt).removeprefix("torch.")


def config_dtype(config) -> torch.dtype | None:
    """The dtype a transformers config declares (``dtype`` or legacy ``torch_dtype``), if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    return None


def stats_device(device: torch.device) -> torch.device:
    """Where float64 statistics and decompositions run: the device if it does float64 well, else CPU.

    Data-centre GPUs (compute capability 8.0 / 9.0: A100, H100, H200) have fast float64;
    consumer GPUs run it at 1/32–1/64 of float32 speed, so their float64 work goes to the CPU.
    """
    if device.type != "cuda":
        return torch.device("cpu")
    major, minor = torch.cuda.get_device_capability(device)
    return device if (major, minor) in ((6, 0), (7, 0), (8, 0), (9, 0), (10, 0)) else torch.device("cpu")

"""Where and in what precision work runs: ``--device`` and ``--dtype`` checked once, resolved once.

``device``: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
``dtype``: ``auto`` (the checkpoint's own dtype), ``bfloat16``, ``float16``, ``float32``
(short forms bf16, fp16, half, fp32, float accepted).
Second-moment statistics, whitening and Cholesky stay float64; :func:`stats_device`
says where (on the device when it runs float64 well, else on the CPU).
The *storage* dtype (``--dtype``: what the checkpoint holds) and the *compute* dtype
(``--compute-dtype``: what the block being worked on is upcast to) differ only where the device
has no fast kernels for the storage dtype: :func:`compute_dtype` decides.

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


def check_compute_dtype(value: Any) -> Any:
    """Like :func:`check_dtype`, for ``--compute-dtype`` (the message names that option); imports no torch."""
    try:
        return check_dtype(value)
    except RankwiseError:
        raise RankwiseError(f"unknown compute dtype {value!r}; use one of {', '.join(DTYPE_CHOICES)}.") from None


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


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def fast_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` has native matmul kernels for ``dtype`` (else torch emulates it, 5–100× slower).

    CUDA: bfloat16 from compute capability 8.0 (Ampere) on (``torch.cuda.is_bf16_supported``),
    float16 everywhere. CPU: bfloat16 with AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension
    (Arm), float16 with AMX-FP16 or AVX512-FP16 (x86) or FPHP/ASIMDHP (Arm); float32/float64 always.
    Measured on an AVX2-only EPYC (no bf16 instructions): a bf16 linear forward is 5.6× slower than
    float32 and its backward ~100× slower (docs/scale.md), which is why :func:`compute_dtype` exists.
    """
    import torch

    if dtype in (torch.float32, torch.float64):
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu":
        return True  # other accelerators (mps, xpu): trust the backend
    flags = _cpu_flags()
    if dtype == torch.bfloat16:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    if dtype == torch.float16:
        return bool(flags & {"amx_fp16", "avx512_fp16", "fphp", "asimdhp"})
    return False


def compute_dtype(device: torch.device, storage_dtype: torch.dtype, spec: Any = "auto") -> torch.dtype:
    """The dtype a block is upcast to while it works on ``device`` (its factors are stored in ``storage_dtype``).

    ``spec`` ``auto``: ``storage_dtype`` where ``device`` runs it natively (:func:`fast_on`),
    float32 otherwise (bf16/fp16 on a CPU without those instructions). A dtype name forces it.
    Only the block being worked on (and the parts outside the blocks: embeddings, final norm,
    head) is held in the compute dtype; blocks are read from the checkpoint into it and their
    factors are cast back to ``storage_dtype`` when written, so the peak grows by one block's
    upcast, not by the model's. Statistics stay float64 whatever this says (:func:`stats_device`).
    """
    import torch

    spec = check_compute_dtype("auto" if spec is None else spec)
    if spec == "auto":
        return storage_dtype if fast_on(device, storage_dtype) else torch.float32
    return resolve_dtype(spec, storage_dtype)

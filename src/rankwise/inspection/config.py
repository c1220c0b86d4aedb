""":class:`InspectConfig`: what ``rankwise inspect`` computes and how; validated on construction.

The CLI options of ``rankwise inspect`` are built from these fields
(:func:`rankwise.config.add_config_arguments`), so every default is written here once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rankwise.config import check_numbers
from rankwise.engine import SPECTRUM_METHODS
from rankwise.engine.device import DTYPE_CHOICES, check_device, check_dtype  # torch-free checks
from rankwise.errors import RankwiseError, check_ratio

DEVICE_HELP = "where the decompositions run: auto (CUDA when present), cpu, cuda or cuda:N"


@dataclass
class InspectConfig:
    """What to inspect and how.

    ``targets``/``exclude``: regexes over module names (default: every Linear /
    Conv1D except the LM head and layers tied to the embeddings). ``ratio``: the
    compression ratio (fraction of targeted parameters removed) at which the
    WeLore threshold and LRC / N-LRC classes are computed. ``farms``: also fit
    α on FARMS submatrix spectra. ``compare``: a fine-tuned model (module, name
    or folder) with the same targets; adds intruder dimensions (``intruder_top``
    top singular vectors of the tuned matrix whose best |cosine| to every
    singular vector of the base matrix is below ``intruder_eps``) and the
    relative spectral change ‖σ′ − σ‖₂ / ‖σ‖₂. ``progress``: show a progress bar
    on stderr. ``spectrum_method``: ``"gram"`` (default; float64 eigenvalues of
    the smaller Gram matrix, several times faster than an SVD on CPU) or
    ``"svd"`` (float32 ``svdvals``); see ``engine.svd.spectra``. ``threads``:
    torch threads used while computing (default 1; ``None`` or 0 keeps torch's
    setting). One thread is the robust default: the decompositions are small
    and batched, and on a shared, oversubscribed CPU multi-threaded LAPACK
    calls can slow down by orders of magnitude (measured: ``eigvalsh`` on ten
    576×576 matrices 0.5 s with 1 thread, 100 s with 2 threads on 2 busy cores).

    ``device``: where the decompositions run (``auto``: CUDA when present; float64
    Gram spectra go to the CPU on GPUs without fast float64, see
    ``engine.device.stats_device``). ``dtype``: the precision the weights are read
    in before analysis (``auto``: the checkpoint's own). ``stream``: read a model
    folder one tensor at a time from its safetensors without building the model
    (``None`` = whenever the model is a folder with safetensors; ``False`` loads the
    whole model first). ``max_batch_bytes``: matrices of one shape decomposed
    together, at most this many bytes of float64 copies at once; a streamed
    matrix larger than this is read and decomposed alone, so peak memory is one
    matrix (0: always one at a time).
    """

    targets: str | None = field(default=None, metadata={"metavar": "REGEX",
                                                         "help": "only modules whose name matches REGEX"})
    exclude: str | None = field(default=None, metadata={"metavar": "REGEX",
                                                        "help": "drop modules whose name matches REGEX"})
    ratio: float = field(default=0.2, metadata={"type": check_ratio, "help": "compression ratio for the WeLore "
                                                "LRC/N-LRC classes (fraction of parameters removed)"})
    min_saving: float = field(default=0.1, metadata={"help": "WeLore: smallest saving of an LRC"})
    farms: bool = field(default=False, metadata={"help": "also fit α on FARMS (fixed aspect ratio) submatrices"})
    farms_side: int | None = field(default=None, metadata={"cli": False})
    compare: Any = field(default=None, metadata={
        "metavar": "TUNED_MODEL",
        "help": "a fine-tuned version of MODEL: adds intruder dimensions and relative spectral change per matrix"})
    intruder_eps: float = field(default=0.5, metadata={"help": "cosine threshold of an intruder"})
    intruder_top: int = field(default=10, metadata={"help": "top singular vectors checked"})
    progress: bool = field(default=True, metadata={"cli": False})
    keep_spectra: bool = field(default=True, metadata={"cli": False})
    spectrum_method: str = field(default="gram", metadata={
        "cli": "--spectrum", "choices": SPECTRUM_METHODS,
        "help": "how singular values are computed: float64 Gram eigenvalues (fast) or float32 svdvals"})
    threads: int | None = field(default=1, metadata={
        "help": "torch threads for the decompositions (1 is robust on busy machines; 0 = torch's default)"})
    device: str = field(default="auto", metadata={"metavar": "auto|cpu|cuda|cuda:N", "type": check_device,
                                                  "help": DEVICE_HELP})
    dtype: Any = field(default="auto", metadata={
        "metavar": "|".join(DTYPE_CHOICES), "type": check_dtype,
        "help": "precision the weights are read in (auto: the checkpoint's own)"})
    stream: bool | None = field(default=None, metadata={
        "help": "read a model folder one tensor at a time (never build the model); default: on for folders "
                "with safetensors"})
    max_batch_bytes: int = field(default=64 * 2**20, metadata={"cli": False})

    def __post_init__(self) -> None:
        check_numbers(self)  # the API bypasses the CLI's parsing: finite floats, whole 64-bit ints
        self.validate()

    def validate(self) -> None:
        """Raise :class:`RankwiseError` for any value outside its range (called on construction)."""
        self.ratio = check_ratio(self.ratio)
        for name in ("min_saving", "intruder_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise RankwiseError(f"{name} must be a finite number, got {v!r}.")
        if not 0.0 < float(self.intruder_eps) < 1.0:
            raise RankwiseError(f"intruder_eps must lie in (0, 1) (a cosine similarity), got {self.intruder_eps}.")
        for name in ("intruder_top", "max_batch_bytes", "threads", "farms_side"):
            v = getattr(self, name)
            if v is None and name in ("threads", "farms_side"):
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise RankwiseError(f"{name} must be a whole number, got {v!r}.")
        if self.intruder_top < 1:
            raise RankwiseError(f"intruder_top must be at least 1, got {self.intruder_top}.")
        if self.threads is not None and self.threads < 0:
            raise RankwiseError(f"threads must be 0 (torch's default) or a positive count, got {self.threads}.")
        if self.farms_side is not None and self.farms_side < 1:
            raise RankwiseError(f"farms_side must be at least 1, got {self.farms_side}.")
        if self.max_batch_bytes < 0:
            raise RankwiseError(f"max_batch_bytes must be 0 or more, got {self.max_batch_bytes}.")
        if self.spectrum_method not in SPECTRUM_METHODS:
            raise RankwiseError(f"spectrum_method must be one of {', '.join(SPECTRUM_METHODS)}, "
                                f"got {self.spectrum_method!r}.")
        if not 0.0 <= float(self.min_saving) < 1.0:
            raise RankwiseError(f"min_saving must lie in [0, 1), got {self.min_saving}.")
        self.device = check_device(self.device)
        self.dtype = check_dtype(self.dtype)
        for name in ("targets", "exclude"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise RankwiseError(f"{name} must be a regular expression string, got {type(v).__name__}.")

""":class:`EvalConfig`: what ``rankwise eval`` measures and how; validated on construction.

The CLI options of ``rankwise eval`` are built from these fields
(:func:`rankwise.config.add_config_arguments`), so every default is written here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rankwise.config import positive_int as _positive  # whole, ≥ 1, 64-bit; one-line errors
from rankwise.errors import RankwiseError
from rankwise.inspection.config import DEVICE_HELP, DTYPE_CHOICES, check_device, check_dtype

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def text_list(value: Any) -> list[str]:
    """``"ptb,bbc"`` (or a list) → ``["ptb", "bbc"]``; an empty item is a one-line error."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    if not items or not all(items):
        raise RankwiseError(f"empty item in the text list {value!r}; separate names with commas, e.g. ptb,bbc.")
    return items


def check_device_map(value: Any) -> str | None:
    """``None`` or one of accelerate's automatic placements (auto, balanced, balanced_low_0, sequential)."""
    if value is None:
        return None
    v = str(value).strip().lower()
    if v not in DEVICE_MAPS:
        raise RankwiseError(f"unknown --device-map {value!r}; use one of {', '.join(DEVICE_MAPS)}.")
    return v


def parse_max_memory(value: Any) -> dict[str, str] | None:
    """``"cpu=8GiB,0=70GiB"`` → ``{"cpu": "8GiB", 0: "70GiB"}`` (accelerate's ``max_memory``); None stays None."""
    if value is None or isinstance(value, dict):
        return value
    out: dict[Any, str] = {}
    for item in str(value).split(","):
        where, sep, amount = item.strip().partition("=")
        where, amount = where.strip().lower(), amount.strip()
        if not sep or not amount or not (where in ("cpu", "disk") or where.isdigit()) or not amount[0].isdigit():
            raise RankwiseError(f"--max-memory item {item.strip()!r} is not DEVICE=SIZE; write e.g. cpu=8GiB,0=70GiB.")
        out[int(where) if where.isdigit() else where] = amount
    return out


@dataclass
class EvalConfig:
    """How ``rankwise eval`` measures its models.

    ``text``: eval texts (``ptb``, ``bbc`` or ``.txt`` paths; test splits), each scored on the
    first ``tokens`` tokens in non-overlapping ``seq_len`` windows with BOS. ``speed``: also
    time prefill (``prompt_tokens``) and greedy decode (``new_tokens``), median of ``repeats``
    alternating runs after ``warmup``. ``threads``: torch CPU threads (``None``: torch's choice),
    recorded in the output. ``device``/``dtype``: where and in what precision the models run
    (``auto``: CUDA when present / the checkpoint's own dtype). ``device_map``: load through
    accelerate's big-model placement (``auto``: fill the GPUs, then CPU RAM, then disk) instead
    of ``device``, each device holding at most ``max_memory`` (the rest offloaded to disk).
    ``compare``: a reference model; ratios model / compare are reported. ``plot``: draw
    perplexity against bytes on disk and against prefill tokens/s for every model into this
    image file (turns ``speed`` on).
    """

    text: list[str] = field(default_factory=lambda: ["ptb"], metadata={
        "type": text_list, "metavar": "ptb,bbc,FILE.txt",
        "help": "comma-separated eval texts: ptb, bbc or FILE.txt (test splits)"})
    tokens: int = field(default=4096, metadata={"type": _positive("--tokens"), "help": "token budget per text"})
    seq_len: int = field(default=512, metadata={"type": _positive("--seq-len"),
                                                "help": "window length; non-overlapping windows, BOS prepended"})
    speed: bool = field(default=False, metadata={"help": "also measure prefill and decode tokens/s and peak memory"})
    prompt_tokens: int = field(default=512, metadata={
        "type": _positive("--prompt-tokens"), "help": "prefill prompt length for --speed, from the first --text"})
    new_tokens: int = field(default=64, metadata={"type": _positive("--new-tokens"),
                                                  "help": "greedy tokens decoded with the KV cache for --speed"})
    repeats: int = field(default=5, metadata={"type": _positive("--repeats"),
                                              "help": "timed repeats for --speed, median reported"})
    warmup: int = field(default=1, metadata={"help": "untimed warm-up rounds for --speed"})
    threads: int | None = field(default=None, metadata={
        "type": _positive("--threads"), "help": "torch CPU threads (default: torch's choice; 1 is steadier on a "
                                                "busy machine); recorded in the JSON"})
    device: str = field(default="auto", metadata={"metavar": "auto|cpu|cuda|cuda:N", "type": check_device,
                                                  "help": DEVICE_HELP.replace("the decompositions", "the models")})
    dtype: Any = field(default="auto", metadata={"metavar": "|".join(DTYPE_CHOICES), "type": check_dtype,
                                                 "help": "precision of the models (auto: each checkpoint's own)"})
    device_map: str | None = field(default=None, metadata={
        "metavar": "|".join(DEVICE_MAPS), "type": check_device_map,
        "help": "load with accelerate's big-model placement (GPU, then CPU, then disk offload) instead of --device"})
    max_memory: Any = field(default=None, metadata={
        "metavar": "cpu=8GiB,0=70GiB", "type": parse_max_memory,
        "help": "with --device-map: memory each device may hold; the rest is offloaded to disk"})
    compare: str | None = field(default=None, metadata={
        "metavar": "DENSE", "help": "a second (usually the dense) model measured side by side; adds ratios"})
    plot: str | None = field(default=None, metadata={
        "metavar": "FILE.png", "help": "draw perplexity against bytes on disk and against prefill tokens/s for "
                                       "every model (turns --speed on)"})

    def __post_init__(self) -> None:
        self.text = text_list(self.text)
        for name in ("tokens", "seq_len", "prompt_tokens", "new_tokens", "repeats"):
            setattr(self, name, _positive(name)(getattr(self, name)))
        if self.threads is not None:
            self.threads = _positive("threads")(self.threads)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise RankwiseError(f"--warmup must be a whole number 0 or more, got {self.warmup!r}.")
        self.device = check_device(self.device)
        self.dtype = check_dtype(self.dtype)
        self.device_map = check_device_map(self.device_map)
        self.max_memory = parse_max_memory(self.max_memory)
        if self.max_memory is not None and self.device_map is None:
            raise RankwiseError("--max-memory only applies with --device-map (e.g. --device-map auto).")
        if self.device_map is not None and self.device != "auto":
            raise RankwiseError("--device and --device-map both place the model; pass only one of them.")
        if self.plot is not None:
            if not str(self.plot).lower().endswith((".png", ".svg", ".pdf")):
                raise RankwiseError(f"--plot {self.plot}: name a .png (or .svg / .pdf) file.")
            self.speed = True

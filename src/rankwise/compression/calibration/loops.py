"""Calibration data → ``forward_loop(model)`` callables (ModelOpt style).

A forward loop is any callable that takes the model and runs it on calibration
data; rankwise attaches hooks around it. :func:`text_forward_loop` builds one
from text (seeded random windows); :func:`windows_forward_loop` from a
LongTensor of token windows. For ``fwsvd`` the loop must also call
``backward`` on a loss: the loops built here do so when ``with_loss=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError

ForwardLoop = Callable[[nn.Module], Any]


@dataclass
class CalibInfo:
    """What the calibration data was, recorded in ``rankwise.json``."""

    text: str | None = None
    sha256: str | None = None
    samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    tokens: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {
            "text": self.text,
            "sha256": self.sha256,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens": self.tokens,
        }
        d.update(self.extra)
        return d


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def windows_forward_loop(windows: torch.Tensor, batch_size: int = 8, with_loss: bool = False) -> ForwardLoop:
    """A loop over the rows of a (n_samples, seq_len) LongTensor of token ids.

    With ``with_loss`` it computes the causal-LM loss and calls ``backward`` on it
    (what FWSVD's gradient statistics need); otherwise it runs under ``no_grad``.
    """
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.long or windows.dim() != 2:
        raise RankwiseError("calibration windows must be a 2-D LongTensor of token ids (samples × seq_len).")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise RankwiseError(f"calibration windows of shape {tuple(windows.shape)} are too small; need ≥1×2 tokens.")

    def loop(model: nn.Module) -> None:
        dev = _device(model)
        for i in range(0, windows.shape[0], batch_size):
            x = windows[i : i + batch_size].to(dev)
            if with_loss:
                with torch.enable_grad():
                    out = model(input_ids=x, labels=x, use_cache=False)
                    out.loss.backward()
            else:
                with torch.no_grad():
                    model(input_ids=x, use_cache=False)

    loop.n_batches = (windows.shape[0] + batch_size - 1) // batch_size  # type: ignore[attr-defined]
    return loop


class _CachedTokenizer:
    """A tokenizer whose whole-text encodings are cached on disk (``cache_dir()/tokens``).

    Calibration draws a few windows from the token ids of the *whole* training text; encoding
    PTB-train (5 MB) takes 20 s on an idle core and ~700 MB of transient memory (the fast
    tokenizer's per-token offsets and strings), which dominated a SmolLM2 compress. The ids
    of one (tokenizer, text) pair never change, so they are kept as an int32 file keyed by the
    sha256 of the tokenizer's serialisation and of the text, written atomically. Tokenizers
    without a serialisable fast backend are used as they are.
    """

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._key = None
        if backend is not None:
            import hashlib

            try:
                self._key = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:32]
            except (AttributeError, TypeError, ValueError):
                self._key = None

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def __call__(self, text: str, add_special_tokens: bool = False, return_attention_mask: bool = False, **kw):
        if self._key is None or add_special_tokens or kw or len(text) < 100_000:
            return self._tok(text, add_special_tokens=add_special_tokens,
                             return_attention_mask=return_attention_mask, **kw)
        import os

        from rankwise.io.models import cache_dir
        from rankwise.io.texts import text_fingerprint

        path = cache_dir() / "tokens" / f"{self._key}-{text_fingerprint(text)[:32]}.pt"
        if path.is_file():
            try:
                return {"input_ids": torch.load(path, weights_only=True).tolist()}
            except (OSError, RuntimeError, EOFError):
                path.unlink(missing_ok=True)  # a damaged cache file: encode again
        ids = self._tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(torch.tensor(ids, dtype=torch.int32), tmp)
            os.replace(tmp, path)
        except OSError:  # a read-only cache: still correct, just not cached
            pass
        return {"input_ids": ids}


@dataclass(frozen=True)
class MixturePart:
    """One text of a calibration mixture: its spec, normalised weight and number of windows."""

    text: str
    weight: float
    samples: int


_SPLIT_NAMES = ("train", "valid", "test")


def _check_text_name(part: str, spec: str) -> None:
    """A part must name a built-in text (optionally ``name:split``) or an existing file/folder."""
    from pathlib import Path

    from rankwise.io.texts import BUILTIN_TEXTS

    name, sep, split = part.partition(":")
    if name in BUILTIN_TEXTS and (not sep or split in _SPLIT_NAMES):
        return
    if Path(part).expanduser().exists():
        return
    raise RankwiseError(
        f"calibration {spec!r}: unknown text {part!r}; use {', '.join(BUILTIN_TEXTS)} or a path to a .txt file, "
        "alone or as a mixture like ptb+bbc or ptb:3+bbc:1."
    )


def parse_mixture(spec: str, n_samples: int) -> list[MixturePart]:
    """Parse a calibration spec into parts with normalised weights and window counts.

    ``ptb`` / ``FILE.txt``: one part. ``ptb+bbc``: equal shares. ``ptb:3+bbc:1``: weights (positive,
    finite; normalised to sum 1). A suffix naming a split (``ptb:valid``) is part of the text, not a
    weight; a part that is an existing file is taken whole. The ``n_samples`` windows are shared out by
    the largest-remainder method (floors of ``n·w``, then one more window to the parts with the largest
    fractional remainders, earlier parts first on ties): every part gets ≥ 0 windows, the total is
    ``n_samples``, and the result depends only on the spec.
    """
    import math
    from fractions import Fraction
    from pathlib import Path

    spec = str(spec).strip()
    if not spec:
        raise RankwiseError("empty calibration text spec; use ptb, bbc, a mixture like ptb:3+bbc:1, or a .txt file.")
    raw = spec.split("+")
    if any(not p.strip() for p in raw):
        raise RankwiseError(f"calibration {spec!r} has an empty part; write parts as name[:weight] joined by '+', "
                            "e.g. ptb:3+bbc:1.")
    names: list[str] = []
    weights: list[float] = []
    for part in (p.strip() for p in raw):
        name, weight = part, 1.0
        if ":" in part and not Path(part).expanduser().is_file():
            head, _, tail = part.rpartition(":")
            if tail not in _SPLIT_NAMES:
                try:
                    weight = float(tail)
                except ValueError:
                    raise RankwiseError(f"calibration {spec!r}: the weight {tail!r} of {head!r} is not a number; "
                                        "write name:weight with a positive number, e.g. ptb:3+bbc:1.") from None
                if not math.isfinite(weight) or weight <= 0:
                    raise RankwiseError(f"calibration {spec!r}: the weight of {head!r} must be a positive finite "
                                        f"number, got {tail}.")
                name = head.strip()
                if not name:
                    raise RankwiseError(f"calibration {spec!r} has a weight without a text name ({part!r}).")
        _check_text_name(name, spec)
        names.append(name)
        weights.append(weight)
    total = math.fsum(weights)
    norm = [w / total for w in weights]
    exact = [Fraction(w) for w in weights]  # exact quotas: equal remainders tie exactly (then the earlier part wins)
    quota = [n_samples * w / sum(exact) for w in exact]
    counts = [math.floor(q) for q in quota]
    left = n_samples - sum(counts)
    order = sorted(range(len(quota)), key=lambda i: (-(quota[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return [MixturePart(text=n, weight=w, samples=k) for n, w, k in zip(names, norm, counts)]


def _interleave(rows: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-part windows so that every prefix holds the parts in about their shares.

    Window j of a part with k windows sorts at (j + ½)/k (stable on ties, earlier parts first): the
    loss-sensitivity pass reads the first windows only, and distributed runs share windows out by
    position, so a part-after-part order would give them one text only.
    """
    keyed = [((j + 0.5) / len(r), p, j) for p, r in enumerate(rows) for j in range(len(r))]
    keyed.sort()
    return torch.stack([rows[p][j] for _, p, j in keyed])


def text_windows(
    tokenizer, text_spec: str, n_samples: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, CalibInfo]:
    """Seeded calibration windows from a text spec, train split (see :func:`parse_mixture`).

    Part ``i`` of a mixture draws its windows with seed ``seed + i``; the windows of the parts are
    interleaved (:func:`_interleave`). ``CalibInfo.extra["mixture"]`` records each part's text,
    normalised weight, window count and sha256.
    """
    from rankwise.io.texts import load_text, text_fingerprint
    from rankwise.io.tokens import sample_windows

    if n_samples < 1:
        raise RankwiseError(f"--calib-samples must be at least 1, got {n_samples}.")
    if seq_len < 2:
        raise RankwiseError(f"--seq-len must be at least 2, got {seq_len}.")
    parts = parse_mixture(text_spec, n_samples)
    rows, shas = [], []
    tokenizer = _CachedTokenizer(tokenizer)
    for i, part in enumerate(parts):
        need = f"{n_samples} samples of {seq_len} tokens need about {n_samples * (seq_len - 1)} tokens"
        try:
            text = load_text(part.text, split="train")
        except RankwiseError as exc:
            if "empty" in str(exc):
                raise RankwiseError(f"calibration text {part.text!r} is empty; {need}.") from exc
            raise
        if not text.strip():
            raise RankwiseError(f"calibration text {part.text!r} is empty; {need}.")
        shas.append(text_fingerprint(text))
        if part.samples:
            rows.append(sample_windows(tokenizer, text, part.samples, seq_len, seed=seed + i,
                                       name=f"calibration text {part.text!r}"))
    windows = _interleave(rows) if len(rows) > 1 else rows[0]
    extra = {}
    if len(parts) > 1:
        extra["mixture"] = [{"text": p.text, "weight": p.weight, "samples": p.samples, "sha256": s}
                            for p, s in zip(parts, shas)]
    info = CalibInfo(
        text=str(text_spec),
        sha256=shas[0] if len(shas) == 1 else text_fingerprint("+".join(shas)),
        samples=n_samples,
        seq_len=seq_len,
        seed=seed,
        tokens=int(windows.numel()),
        extra=extra,
    )
    return windows, info


def text_forward_loop(
    tokenizer, text: str, n_samples: int = 32, seq_len: int = 256, seed: int = 0, batch_size: int = 8
) -> ForwardLoop:
    """A ``forward_loop(model)`` over seeded windows of a text spec (train split); see :func:`text_windows`."""
    windows, info = text_windows(tokenizer, text, n_samples, seq_len, seed)
    loop = windows_forward_loop(windows, batch_size=batch_size)
    loop.calib_info = info  # type: ignore[attr-defined]
    loop.windows = windows  # type: ignore[attr-defined]
    return loop

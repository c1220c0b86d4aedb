"""Turn text into token windows for calibration, evaluation and training.

Conventions (docs/methods.md §6): evaluation windows are consecutive,
non-overlapping slices of ``seq_len`` text tokens from the start of the text,
each with BOS prepended when the tokenizer has one; calibration and training
windows are drawn at seeded random offsets.
"""

from __future__ import annotations

import functools

import torch

from rankwise.errors import RankwiseError
from rankwise.io.texts import text_fingerprint


def bos_id(tokenizer) -> int | None:
    """The tokenizer's BOS id, or None if it has none."""
    return getattr(tokenizer, "bos_token_id", None)


@functools.lru_cache(maxsize=16)
def _encode_cached(tok_key: int, tokenizer_ref, text_sha: str, text: str) -> torch.Tensor:
    ids = tokenizer_ref(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def encode(tokenizer, text: str, max_chars: int | None = None) -> torch.Tensor:
    """Token ids (1-D LongTensor) of ``text`` without special tokens; cached per text.

    ``max_chars`` tokenises only a prefix (enough for a small token budget) to save time.
    """
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
    return _encode_cached(id(tokenizer), tokenizer, text_fingerprint(text), text)


def eval_windows(
    tokenizer, text: str, seq_len: int = 512, max_tokens: int = 4096, name: str = "text"
) -> torch.Tensor:
    """(n_windows, seq_len [+1 with BOS]) consecutive windows covering the first ``max_tokens`` tokens."""
    if seq_len < 2:
        raise RankwiseError(f"--seq-len must be at least 2, got {seq_len}.")
    n_windows = max(1, max_tokens // seq_len)
    # ~4 characters per token on English text; tokenise a generous prefix only
    ids = encode(tokenizer, text, max_chars=max(20_000, n_windows * seq_len * 12))
    if len(ids) < seq_len:
        raise RankwiseError(
            f"{name} has {len(ids)} tokens, fewer than one {seq_len}-token window; "
            f"use a longer text or a smaller --seq-len."
        )
    n_windows = min(n_windows, len(ids) // seq_len)
    win = ids[: n_windows * seq_len].view(n_windows, seq_len)
    b = bos_id(tokenizer)
    if b is not None:
        win = torch.cat([torch.full((n_windows, 1), b, dtype=torch.long), win], dim=1)
    return win


def sample_windows(
    tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0, name: str = "text"
) -> torch.Tensor:
    """(n_samples, seq_len) windows at seeded random offsets (BOS first when the tokenizer has one)."""
    if n_samples < 1:
        raise RankwiseError(f"need at least one calibration sample, got {n_samples}.")
    ids = encode(tokenizer, text)
    b = bos_id(tokenizer)
    body = seq_len - (1 if b is not None else 0)
    need = n_samples * body
    if len(ids) < max(need, body + 1):
        raise RankwiseError(
            f"{name} has {len(ids)} tokens but {n_samples} samples of {seq_len} tokens need {need}; "
            f"give a longer text or fewer --calib-samples / a smaller --seq-len."
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body + 1, (n_samples,), generator=g)
    rows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if b is not None:
        rows = torch.cat([torch.full((n_samples, 1), b, dtype=torch.long), rows], dim=1)
    return rows

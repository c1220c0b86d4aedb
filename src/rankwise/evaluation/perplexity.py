"""Perplexity over non-overlapping windows (docs/methods.md §6)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from rankwise.errors import RankwiseError
from rankwise.io.texts import text_fingerprint
from rankwise.io.tokens import bos_id, eval_windows
from rankwise.progress import progress as progress_bar


@dataclass
class PerplexityResult:
    """exp(mean NLL) over ``tokens`` predicted tokens in ``windows`` windows of ``seq_len``."""

    text: str
    perplexity: float
    nll: float
    windows: int
    tokens: int
    seq_len: int
    bos: bool
    text_sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 512,
    max_tokens: int = 4096,
    batch_size: int = 1,
    name: str = "text",
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a causal LM on the first ``max_tokens`` tokens of ``text``.

    Each window holds ``seq_len`` text tokens; with a BOS token it is prepended
    and every one of the ``seq_len`` text tokens is scored (the first from BOS).
    """
    win = eval_windows(tokenizer, text, seq_len=seq_len, max_tokens=max_tokens, name=name)
    has_bos = bos_id(tokenizer) is not None
    from rankwise.evaluation.models import input_device

    device = input_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    batches = progress_bar(range(0, len(win), batch_size), desc=f"perplexity {name}", unit="batch",
                           enabled=progress)
    for i in batches:
        x = win[i : i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        pred, tgt = logits[:, :-1], x[:, 1:]
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tok += tgt.numel()
    if was_training:
        model.train()
    mean = total_nll / total_tok
    if not math.isfinite(mean):
        raise RankwiseError(
            f"the loss on {name} is {mean} (perplexity not finite): the model's outputs overflow or are broken; "
            "check its weights, or evaluate in float32 (--dtype float32)."
        )
    return PerplexityResult(
        text=name,
        perplexity=math.exp(mean),
        nll=mean,
        windows=len(win),
        tokens=total_tok,
        seq_len=seq_len,
        bos=has_bos,
        text_sha256=text_fingerprint(text),
    )


def evaluate_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    seq_len: int = 512,
    max_tokens: int = 4096,
    split: str = "test",
    progress: bool = False,
) -> dict[str, PerplexityResult]:
    """Perplexity on each named text (``ptb``, ``bbc``, a ``.txt`` path) using its ``split`` (test by default)."""
    from rankwise.io.texts import load_text

    return {
        spec: perplexity(
            model, tokenizer, load_text(spec, split), seq_len=seq_len, max_tokens=max_tokens, name=spec,
            progress=progress,
        )
        for spec in texts
    }

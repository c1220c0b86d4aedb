"""The small training loop behind ``rankwise tune`` (and the benchmark): AdamW, lm or classify.

* ``lm``: causal-LM loss on windows of ``seq_len`` tokens drawn at seeded
  random offsets from the train split (BOS first); evaluation is perplexity on
  the held-out split (``evaluation.perplexity``, 512-token windows).
* ``classify``: sequence classification on labelled texts (BBC: 5 labels via
  ``io.texts.load_labelled``), articles truncated to ``seq_len`` tokens, a
  fresh head trained with the adapter; evaluation is accuracy on the test split.

Loss = task loss + :func:`rankwise.tune.regularization_loss` (SORSA's term).
Linear learning-rate decay to zero, gradient clipping at 1.0, a tqdm bar that
shows the running loss. Peak memory is sampled (process RSS) while training.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.progress import progress as progress_bar
from rankwise.tune.api import regularization_loss

TASKS = ("lm", "classify")


@dataclass
class TrainConfig:
    """What to train on and for how long (``steps`` wins over ``epochs``; default 100 steps)."""

    task: str = "lm"
    data: str = "ptb"
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_train: int | None = None  # classify: use only the first N (shuffled) training texts
    max_eval: int | None = None  # classify: evaluate on the first N test texts
    eval_tokens: int = 4096  # lm: perplexity token budget
    eval_seq_len: int = 512

    def validate(self) -> TrainConfig:
        if self.task not in TASKS:
            raise RankwiseError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.steps is not None and self.steps < 1:
            raise RankwiseError(f"--steps must be >= 1, got {self.steps}.")
        if self.epochs is not None and not self.epochs > 0:
            raise RankwiseError(f"--epochs must be positive, got {self.epochs}.")
        if self.batch_size < 1:
            raise RankwiseError(f"--batch-size must be >= 1, got {self.batch_size}.")
        if self.seq_len < 8:
            raise RankwiseError(f"--seq-len must be >= 8, got {self.seq_len}.")
        if not self.lr > 0:
            raise RankwiseError(f"--lr must be positive, got {self.lr}.")
        for flag, v in (("--lr", self.lr), ("--epochs", self.epochs)):
            if v is not None and not math.isfinite(v):
                raise RankwiseError(f"{flag} must be a finite number, got {v}.")
        for flag, v in (("--eval-tokens", self.eval_tokens), ("--max-train", self.max_train),
                        ("--max-eval", self.max_eval)):
            if v is not None and v < 1:
                raise RankwiseError(f"{flag} must be >= 1, got {v}.")
        return self


@dataclass
class TrainResult:
    """Losses and timings of one run."""

    steps: int
    losses: list[float]
    seconds: float
    s_per_step: float
    peak_rss_mb: float
    peak_rss_delta_mb: float
    examples: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["first_loss"] = self.losses[0] if self.losses else None
        d["final_loss"] = sum(self.losses[-10:]) / max(1, len(self.losses[-10:])) if self.losses else None
        del d["losses"]
        return d


# -- data -----------------------------------------------------------------------------------------
class LMData:
    """Seeded random windows of the train split; one epoch = len(tokens) / (batch·seq_len) steps."""

    def __init__(self, tokenizer, text: str, cfg: TrainConfig, need_tokens: int | None = None) -> None:
        from rankwise.io.tokens import bos_id, encode

        # tokenise only as much text as the run can use (≈4 chars per token, generous margin)
        max_chars = None if need_tokens is None else max(200_000, need_tokens * 8)
        self.ids = encode(tokenizer, text, max_chars=max_chars)
        self.bos = bos_id(tokenizer)
        self.body = cfg.seq_len - (1 if self.bos is not None else 0)
        if len(self.ids) < self.body + 1:
            raise RankwiseError(f"the training text has {len(self.ids)} tokens, fewer than one --seq-len window.")
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.ids) // (self.body * self.cfg.batch_size))

    def batch(self) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(self.ids) - self.body, (self.cfg.batch_size,), generator=self.gen)
        rows = torch.stack([self.ids[s: s + self.body] for s in starts.tolist()])
        if self.bos is not None:
            rows = torch.cat([torch.full((len(rows), 1), self.bos, dtype=torch.long), rows], dim=1)
        return {"input_ids": rows, "labels": rows}


class ClassifyData:
    """Shuffled mini-batches of (text, label), re-shuffled every epoch; texts truncated to seq_len tokens."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], cfg: TrainConfig) -> None:
        self.tok, self.cfg = tokenizer, cfg
        order = list(range(len(texts)))
        random.Random(cfg.seed).shuffle(order)
        if cfg.max_train:
            order = order[: cfg.max_train]
        self.texts = [texts[i] for i in order]
        self.labels = [labels[i] for i in order]
        self.rng = random.Random(cfg.seed + 1)
        self._queue: list[int] = []

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.texts) / self.cfg.batch_size))

    def batch(self) -> dict[str, torch.Tensor]:
        if not self._queue:
            self._queue = list(range(len(self.texts)))
            self.rng.shuffle(self._queue)
        idx, self._queue = self._queue[: self.cfg.batch_size], self._queue[self.cfg.batch_size:]
        enc = self.tok([self.texts[i] for i in idx], truncation=True, max_length=self.cfg.seq_len,
                       padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return dict(enc)


def ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Decoder tokenizers often lack a pad token; classification needs one (use EOS, as is customary)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


# -- memory sampler -------------------------------------------------------------------------------
class PeakRSS:
    """Samples the process RSS every 20 ms in a thread; ``peak_mb`` is the maximum seen (CPU memory)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def delta_mb(self) -> float:
        """Peak RSS above the RSS at entry: the memory the training run itself added."""
        return (self.peak - self.start) / 2**20


# -- loop -----------------------------------------------------------------------------------------
def train(model: nn.Module, data: LMData | ClassifyData, cfg: TrainConfig, progress: bool = True,
          params: list[nn.Parameter] | None = None) -> TrainResult:
    """Run AdamW on the trainable parameters of ``model`` for ``cfg.steps`` (or ``cfg.epochs``) steps."""
    cfg.validate()
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RankwiseError("nothing to train: no parameter requires grad (apply an adapter first).")
    if cfg.steps is not None:
        steps = cfg.steps
    elif cfg.epochs is not None:
        steps = max(1, math.ceil(cfg.epochs * data.steps_per_epoch()))
    else:
        steps = 100
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / steps))
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    bar = progress_bar(range(steps), desc=f"tune {cfg.task}", unit="step", enabled=progress, leave=True)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        for _ in bar:
            batch = {k: v.to(device) for k, v in data.batch().items()}
            out = model(**batch)
            loss = out.loss + regularization_loss(model)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            if not math.isfinite(losses[-1]):
                raise RankwiseError(f"the loss became {losses[-1]} at step {len(losses)}; lower --lr.")
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(steps=steps, losses=losses, seconds=seconds, s_per_step=seconds / steps,
                       peak_rss_mb=mem.peak_mb, peak_rss_delta_mb=mem.delta_mb, examples=steps * cfg.batch_size)


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, texts: list[str], labels: list[int], seq_len: int = 256,
             batch_size: int = 16, progress: bool = True) -> float:
    """Fraction of ``texts`` whose argmax logit equals the label (texts truncated to ``seq_len`` tokens)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in progress_bar(range(0, len(texts), batch_size), desc="accuracy", unit="batch", enabled=progress):
        enc = tokenizer(texts[i: i + batch_size], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt").to(device)
        pred = model(**enc).logits.argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[i: i + batch_size])).sum())
    return correct / max(1, len(texts))


def evaluate(model: nn.Module, tokenizer, cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Held-out metric: PTB-style perplexity (lm) or accuracy (classify)."""
    if cfg.task == "lm":
        from rankwise.evaluation.perplexity import perplexity
        from rankwise.io.texts import load_text

        text = load_text(cfg.data, "test")
        res = perplexity(model, tokenizer, text, seq_len=cfg.eval_seq_len, max_tokens=cfg.eval_tokens,
                         name=f"{cfg.data}:test", progress=progress)
        return {"metric": "perplexity", "value": res.perplexity, **res.to_dict()}
    from rankwise.io.texts import load_labelled

    texts, labels, names = load_labelled(cfg.data, "test")
    if cfg.max_eval:
        texts, labels = texts[: cfg.max_eval], labels[: cfg.max_eval]
    acc = accuracy(model, tokenizer, texts, labels, seq_len=cfg.seq_len, progress=progress)
    return {"metric": "accuracy", "value": acc, "examples": len(texts), "labels": names}


def make_data(tokenizer, cfg: TrainConfig) -> LMData | ClassifyData:
    """Training data of ``cfg.task`` from the train split of ``cfg.data``."""
    if cfg.task == "lm":
        from rankwise.io.texts import load_text

        text = load_text(cfg.data, "train")
        need = None
        if cfg.steps is not None:
            need = cfg.steps * cfg.batch_size * cfg.seq_len
        return LMData(tokenizer, text, cfg, need_tokens=need)
    from rankwise.io.texts import load_labelled

    texts, labels, _ = load_labelled(cfg.data, "train")
    return ClassifyData(tokenizer, texts, labels, cfg)

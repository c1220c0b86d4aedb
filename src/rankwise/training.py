"""The one training loop of rankwise: ``transformers.Trainer``, used by ``rankwise tune``, ``rankwise train``,
compression healing and the benchmarks (no other loop in rankwise calls ``optimizer.step()``).

Gradient accumulation, mixed precision, logging, checkpoints and resume come
from the HF Trainer; rankwise adds

* :class:`TrainConfig`: what to train on and for how long (validated in
  ``__post_init__``; the CLI options are built from its fields);
* data: :class:`LMWindows` (non-overlapping ``seq_len`` windows of a text,
  BOS first, shuffled by the Trainer's seeded sampler) and
  :class:`LabelledTexts` + :class:`TextCollator` (classification);
* :class:`RankwiseTrainer`: adds adapters' extra loss terms (SORSA's
  regulariser) and writes **adapter-only** checkpoints for rankwise's native
  adapters (``adapter.safetensors`` + ``rankwise_adapter.json``, resumed by
  copying them back); PEFT models already checkpoint their adapter only;
* AdaLoRA's budget schedule (``update_and_allocate`` after each optimizer step);
* callbacks that change the model's structure mid-run (Cuttlefish switching a
  matrix to factors) survive Trainer checkpoints: on resume the switches are
  replayed, in their order, into the live model and optimizer before the
  weights and the optimizer state are loaded (``rebuild`` below);
* any optimizer (GaLore, Fira, ...) and scheduler: ``optimizers=(opt, sched)``;
* data parallelism from the launcher: under ``torchrun`` the Trainer wraps the
  model in DDP; a model the caller already sharded with FSDP2's
  ``fully_shard`` trains as it is (see :func:`train`);
* :func:`evaluate`: perplexity (lm) or accuracy (classify) on the test split.

Defaults: AdamW (torch), linear decay to zero without warm-up (``lr_schedule``),
gradient clipping at 1.0, the loss logged every step (``TrainResult.losses``),
per-step wall time and optimizer-state bytes measured by a callback.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from rankwise.config import check_numbers
from rankwise.errors import RankwiseError

TASKS = ("lm", "classify")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "constant", "cosine")
DEFAULT_STEPS = 100


@dataclass
class TrainConfig:
    """What to train on and for how long (``steps`` or ``epochs``; default 100 steps)."""

    task: str | None = field(default=None, metadata={"help": "lm (causal LM) or classify (default: classify for "
                                                             "bbc and labelled folders, else lm)", "choices": TASKS})
    data: str = field(default="ptb", metadata={"help": "ptb, bbc, a .txt file (lm) or a <label>/<n>.txt folder "
                                                       "(classify)"})
    steps: int | None = field(default=None, metadata={"help": f"optimizer steps (default {DEFAULT_STEPS} "
                                                              "when --epochs is not given)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training split"})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate (default: the method's, 2e-4; "
                                                             "10x for svfit, loldu, lora-xs)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training window / article"})
    seed: int = field(default=0, metadata={"help": "seed of data order and random inits"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0: off)"})
    lr_schedule: str = field(default="linear", metadata={"help": "learning-rate schedule (no warm-up): linear "
                                                                 "decay to 0, constant or cosine",
                                                         "choices": SCHEDULES})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16 / fp16 mixed precision",
                                                     "choices": PRECISIONS})
    max_train: int | None = field(default=None, metadata={"help": "classify: use N training texts"})
    max_eval: int | None = field(default=None, metadata={"help": "classify: evaluate on N test texts"})
    eval_tokens: int = field(default=4096, metadata={"help": "lm: perplexity token budget"})
    eval_seq_len: int = field(default=512, metadata={"cli": False})
    save_steps: int | None = field(default=None, metadata={"help": "write a Trainer checkpoint every N steps "
                                                                   "(into --checkpoints)"})
    checkpoints: str | None = field(default=None, metadata={"help": "folder for Trainer checkpoints",
                                                            "metavar": "DIR"})
    resume: str | None = field(default=None, metadata={"help": "resume from a checkpoint folder ('last': the "
                                                                "newest in --checkpoints)", "metavar": "DIR"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})

    def __post_init__(self) -> None:
        check_numbers(self)  # the API bypasses the CLI's parsing: finite floats, whole 64-bit ints
        self.validate()

    def validate(self) -> TrainConfig:
        """One-line :class:`RankwiseError` for a bad field (run on construction); resolves ``task``."""
        if self.task is None:
            from pathlib import Path

            self.task = "classify" if self.data == "bbc" or Path(str(self.data)).expanduser().is_dir() else "lm"
        if self.task not in TASKS:
            raise RankwiseError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.lr_schedule not in SCHEDULES:
            raise RankwiseError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}.")
        if self.precision not in PRECISIONS:
            raise RankwiseError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.steps is not None and self.epochs is not None:
            raise RankwiseError("give --steps or --epochs, not both.")
        for name in ("steps", "batch_size", "grad_accum", "save_steps", "max_train", "max_eval", "eval_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RankwiseError(f"--{name.replace('_', '-')} must be >= 1, got {v}.")
        if self.epochs is not None and not self.epochs > 0:
            raise RankwiseError(f"--epochs must be positive, got {self.epochs}.")
        if self.seq_len < 8:
            raise RankwiseError(f"--seq-len must be >= 8, got {self.seq_len}.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise RankwiseError(f"--lr must be positive, got {self.lr}.")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise RankwiseError("--grad-clip and --weight-decay must be >= 0.")
        if self.save_steps is not None and self.checkpoints is None:
            raise RankwiseError("--save-steps needs --checkpoints DIR (where the Trainer writes checkpoint-N/).")
        if self.resume == "last" and self.checkpoints is None:
            raise RankwiseError("--resume last needs --checkpoints DIR.")
        return self

    @property
    def total_steps_hint(self) -> int | None:
        """Optimizer steps when ``steps`` is given (or the default), None for an epoch budget."""
        if self.epochs is not None:
            return None
        return DEFAULT_STEPS if self.steps is None else self.steps


@dataclass
class TrainResult:
    """Losses and timings of one run.

    ``losses`` are the Trainer's per-step logged losses (under data parallelism: the mean over the
    processes); ``step_seconds`` the wall time of each optimizer step of this call; ``state`` the
    optimizer-state bytes after the last step (:class:`rankwise.train.memory.StateMemory` as a dict) and
    ``peak_state_bytes`` the largest total seen after any step.
    """

    steps: int
    losses: list[float]
    seconds: float
    s_per_step: float
    peak_memory_mb: float
    peak_memory_delta_mb: float
    examples: int
    memory_kind: str = "rss"
    step_seconds: list[float] = field(default_factory=list)
    state: dict[str, int] | None = None
    peak_state_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["first_loss"] = self.losses[0] if self.losses else None
        d["final_loss"] = sum(self.losses[-10:]) / max(1, len(self.losses[-10:])) if self.losses else None
        del d["losses"], d["step_seconds"]
        return d


# -- data -----------------------------------------------------------------------------------------
class LMWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len`` tokens (BOS first) of a token stream; labels = inputs."""

    def __init__(self, tokenizer, text: str, seq_len: int, need_windows: int | None = None) -> None:
        from rankwise.io.tokens import bos_id, encode

        self.bos = bos_id(tokenizer)
        self.body = seq_len - (1 if self.bos is not None else 0)
        # tokenise only as much text as the run can use (≈4 chars per token, generous margin)
        max_chars = None if need_windows is None else max(200_000, need_windows * self.body * 8)
        ids = encode(tokenizer, text, max_chars=max_chars)
        n = len(ids) // self.body
        if n < 1:
            raise RankwiseError(f"the training text has {len(ids)} tokens, fewer than one --seq-len window.")
        self.rows = ids[: n * self.body].view(n, self.body)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        if self.bos is not None:
            row = torch.cat([torch.tensor([self.bos], dtype=row.dtype), row])
        return {"input_ids": row, "labels": row}


class LabelledTexts(torch.utils.data.Dataset):
    """(text, label) pairs, in a seeded shuffled order, optionally only the first ``max_items``."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], seed: int = 0,
                 max_items: int | None = None) -> None:
        import random

        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        if max_items:
            order = order[:max_items]
        self.texts = [texts[i] for i in order]
        self.labels = [int(labels[i]) for i in order]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"text": self.texts[i], "label": self.labels[i]}


class TextCollator:
    """Tokenises a list of ``{"text", "label"}`` items, truncated to ``seq_len`` tokens and padded."""

    def __init__(self, tokenizer, seq_len: int) -> None:
        self.tok, self.seq_len = tokenizer, seq_len

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tok([it["text"] for it in items], truncation=True, max_length=self.seq_len, padding=True,
                       return_tensors="pt")
        enc["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        return dict(enc)


def lm_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length windows."""
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def make_dataset(tokenizer, cfg: TrainConfig) -> tuple[torch.utils.data.Dataset, Any]:
    """(training dataset, collator) of ``cfg.task`` from the train split of ``cfg.data``."""
    if cfg.task == "lm":
        from rankwise.io.texts import load_text

        text = load_text(cfg.data, "train")
        steps = cfg.total_steps_hint
        need = None if steps is None else steps * cfg.batch_size * cfg.grad_accum
        return LMWindows(tokenizer, text, cfg.seq_len, need_windows=need), lm_collate
    from rankwise.io.texts import load_labelled

    texts, labels, _ = load_labelled(cfg.data, "train")
    return LabelledTexts(texts, labels, seed=cfg.seed, max_items=cfg.max_train), TextCollator(tokenizer, cfg.seq_len)


def init_batches(tokenizer, cfg: TrainConfig, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches for data-driven adapter inits (LoRA-GA, EVA, CorDA).

    lm: rankwise's calibration windows (seeded random offsets of the train split, ``io.tokens.sample_windows``);
    classify: the first ``n`` batches of the shuffled training texts.
    """
    if cfg.task == "lm":
        from rankwise.io.texts import load_text
        from rankwise.io.tokens import sample_windows

        rows = sample_windows(tokenizer, load_text(cfg.data, "train"), n * cfg.batch_size, cfg.seq_len,
                              seed=cfg.seed, name=f"{cfg.data}:train")
        return [{"input_ids": r, "labels": r} for r in rows.split(cfg.batch_size)]
    ds, collate = make_dataset(tokenizer, cfg)
    out = []
    for k in range(n):
        items = [ds[i] for i in range(k * cfg.batch_size, min(len(ds), (k + 1) * cfg.batch_size))]
        if items:
            out.append(collate(items))
    return out


def ensure_pad_token(model: nn.Module, tokenizer) -> None:
    """Decoder tokenizers often lack a pad token; classification needs one (use EOS, as is customary)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


# -- the Trainer ----------------------------------------------------------------------------------
def _has_native_adapter(model: nn.Module) -> bool:
    from rankwise.tune.api import adapter_layers

    return hasattr(model, "rankwise_adapter") and bool(adapter_layers(model))


class RankwiseTrainer(Trainer):
    """``transformers.Trainer`` plus adapter regularisers and adapter-only checkpoints for native adapters."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        inner = self.accelerator.unwrap_model(model)
        if _has_native_adapter(inner):
            from rankwise.tune.api import regularization_loss

            reg = regularization_loss(inner)
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                reg = reg / self.args.gradient_accumulation_steps  # the Trainer will not divide this loss
            loss = loss + reg.to(loss.dtype)
        if not torch.isfinite(loss.detach()).all():
            raise RankwiseError(f"the loss became {float(loss.detach())} at step {self.state.global_step + 1}; "
                                "lower --lr.")
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if _is_fsdp2_sharded(model) and state_dict is None:
            # a model sharded before the Trainer (rankwise train --fsdp): every process joins the gather, process 0
            # writes an ordinary folder (rankwise.train.fsdp_checkpoint)
            from rankwise.train.fsdp_checkpoint import full_state_dict

            full = full_state_dict(model)
            return super()._save(output_dir, state_dict=full) if self.args.should_save else None
        if not _has_native_adapter(model):
            return super()._save(output_dir, state_dict=state_dict)
        from rankwise.tune.api import save_adapter

        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:  # the adapter only: its tensors + rankwise_adapter.json, not the whole model
            save_adapter(model, output_dir, overwrite=True, extra={"trainer_step": self.state.global_step})
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not _is_fsdp2_sharded(self.accelerator.unwrap_model(self.model)):
            return super()._save_optimizer_and_scheduler(output_dir)
        from rankwise.train.fsdp_checkpoint import save_optimizer_shard

        save_optimizer_shard(self.optimizer, output_dir, self.args.process_index, self.args.world_size)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if _is_fsdp2_sharded(model):
            from rankwise.train.fsdp_checkpoint import load_full_state_dict

            load_full_state_dict(model, resume_from_checkpoint)
            return None
        if _has_native_adapter(model):
            from rankwise.tune.api import restore_adapter_tensors

            restore_adapter_tensors(model, resume_from_checkpoint)
            return None
        if _stored_structure(resume_from_checkpoint):
            # the checkpoint's layers were factorised by a callback mid-run: this (dense) model cannot take its
            # weights yet; they are loaded once the switches are replayed (_load_optimizer_and_scheduler)
            self._pending_rebuild = resume_from_checkpoint
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resume: restore rankwise callbacks' state and replay their structural changes, then load as usual.

        The Trainer builds (or was given) the optimizer over the model as it was at the start; a callback that
        switched layers to factors mid-run also moved their parameters inside the optimizer. Replaying the
        switches here, with the same :func:`rankwise.train.callbacks.replace_in_optimizer`, gives the optimizer
        the parameter layout of the interrupted run, so its saved state loads into the right tensors.
        """
        if checkpoint is not None and _is_fsdp2_sharded(self.accelerator.unwrap_model(self.model)):
            from rankwise.train.fsdp_checkpoint import load_optimizer_shard

            load_optimizer_shard(self.optimizer, checkpoint, self.args.process_index, self.args.world_size)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))
            return None
        if checkpoint is not None:
            from rankwise.train.fsdp_checkpoint import refuse_unsharded_resume

            refuse_unsharded_resume(checkpoint)
            rebuilt = rebuild(self, checkpoint)
            if getattr(self, "_pending_rebuild", None) == checkpoint:
                self._pending_rebuild = None
                if not rebuilt:
                    raise RankwiseError(f"cannot resume from {checkpoint}: its layers were factorised by a callback "
                                        "that this run does not have; pass the same callbacks.")
                super()._load_from_checkpoint(checkpoint, model=self.accelerator.unwrap_model(self.model))
        return super()._load_optimizer_and_scheduler(checkpoint)


def _stored_callbacks(checkpoint: str) -> dict[str, list[dict]]:
    """The ``ExportableState`` callbacks recorded in ``checkpoint``'s trainer_state.json: class name → states."""
    import json

    path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        stored = json.load(fh).get("stateful_callbacks") or {}
    return {name: data if isinstance(data, list) else [data] for name, data in stored.items()}


def _callback_states(trainer: Trainer, checkpoint: str) -> list[tuple[Any, dict]]:
    """(live callback, its stored state) for every rankwise callback saved in ``checkpoint``'s trainer state."""
    out = []
    for name, data in _stored_callbacks(checkpoint).items():
        live = [cb for cb in trainer.callback_handler.callbacks
                if type(cb).__name__ == name and hasattr(cb, "load_state") and hasattr(cb, "rebuild")]
        out.extend(zip(live, data))  # several callbacks of one class: in order, as the Trainer stores them
    return out


def _stored_structure(checkpoint: str) -> bool:
    """Whether ``checkpoint`` records layers that a callback factorised during the run."""
    for data in _stored_callbacks(checkpoint).values():
        for item in data:
            events = (item.get("attributes") or {}).get("events") or []
            if any(e.get("action") == "factorise" and e.get("step") is not None for e in events):
                return True
    return False


def rebuild(trainer: Trainer, checkpoint: str) -> int:
    """Restore each rankwise callback's state from ``checkpoint`` and replay its switches; returns how many."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    n = 0
    for cb, data in _callback_states(trainer, checkpoint):
        cb.load_state(data.get("attributes") or {})
        n += cb.rebuild(model, trainer.optimizer)
    return n


class _Meter(TrainerCallback):
    """Wall time of each optimizer step of this call and the optimizer-state bytes after it."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.state: Any = None
        self.peak_state = 0
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
        self.step_seconds.append(time.perf_counter() - self._t0)
        if optimizer is not None:
            from rankwise.train.memory import optimizer_state_bytes

            self.state = optimizer_state_bytes(optimizer)
            self.peak_state = max(self.peak_state, self.state.total)

    @property
    def steps(self) -> int:
        return len(self.step_seconds)


class _LossBar(TrainerCallback):
    """One tqdm bar with the running loss (replaces the Trainer's bar, which prints every per-step log)."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc, self.bar, self.recent = enabled, desc, None, []

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        from rankwise.progress import progress

        self.bar = progress(state.max_steps, desc=self.desc, unit="step", enabled=self.enabled, leave=True,
                            initial=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.bar is not None and logs and "loss" in logs:
            self.recent = [*self.recent[-9:], float(logs["loss"])]
            self.bar.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.4f}")

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.close()


class _AdaLoraSchedule(TrainerCallback):
    """AdaLoRA prunes ranks from gradient sensitivities: PEFT's ``update_and_allocate`` after each step."""

    def __init__(self, peft_model: nn.Module) -> None:
        self.peft_model = peft_model

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.peft_model.base_model.update_and_allocate(state.global_step)


def _is_adalora(model: nn.Module) -> bool:
    info = getattr(model, "rankwise_adapter", None)
    return isinstance(info, dict) and getattr(info.get("config"), "method", None) == "adalora"


def training_arguments(cfg: TrainConfig, lr: float, output_dir: str, progress: bool = True,
                       device: str | None = None, find_unused_parameters: bool | None = None) -> TrainingArguments:
    """The ``TrainingArguments`` of a run: AdamW, ``cfg.lr_schedule``, per-step logging, optional checkpoints."""
    from rankwise.engine.device import resolve_device

    dev = resolve_device(device or cfg.device)
    steps = cfg.total_steps_hint
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps if steps is not None else -1,
        num_train_epochs=cfg.epochs if cfg.epochs is not None else 1.0,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        report_to=[],
        use_cpu=dev.type == "cpu",
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        disable_tqdm=True,  # _LossBar draws the bar
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        ddp_find_unused_parameters=find_unused_parameters,
    )


def _is_fsdp2_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def train(model: nn.Module, dataset: torch.utils.data.Dataset, cfg: TrainConfig, *, collator: Any = None,
          lr: float | None = None, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
          callbacks: Sequence[TrainerCallback] = (), progress: bool = True, desc: str | None = None) -> TrainResult:
    """Train ``model``'s trainable parameters with the HF Trainer; returns per-step losses and timings.

    ``lr`` defaults to ``cfg.lr`` (one of them must be set). ``optimizer`` (and ``scheduler``) replace the
    AdamW and the ``cfg.lr_schedule`` schedule the Trainer would build: ``Trainer(optimizers=(optimizer,
    scheduler))``; with ``scheduler=None`` the Trainer builds ``cfg.lr_schedule`` over the given optimizer.
    Checkpoints go to ``cfg.checkpoints`` every ``cfg.save_steps``; ``cfg.resume`` resumes.

    Data parallelism comes from the launcher: under ``torchrun`` (an initialised process group) each
    process takes its ``cfg.batch_size`` share of every step and the Trainer wraps the model in DDP
    (``find_unused_parameters`` when a callback replaces parameters mid-run, as Cuttlefish does). A model
    already sharded with FSDP2 (``fully_shard``) trains as it is: it is marked as the Trainer's
    "sharded at load time" model, so neither DDP nor Accelerate's own FSDP wraps it again. (Accelerate's
    FSDP2 plugin is not used because on CPU/gloo it silently falls back to DDP, and GaLore's optimizer
    has to be built on the sharded parameters anyway; its checkpoints hold the gathered weights and one
    optimizer file per process, :mod:`rankwise.train.fsdp_checkpoint`, and resume with as many processes.)
    """
    lr = lr if lr is not None else cfg.lr
    if lr is None:
        raise RankwiseError("no learning rate: set TrainConfig(lr=...) or pass lr=.")
    if not any(p.requires_grad for p in model.parameters()):
        raise RankwiseError("nothing to train: no parameter requires grad (apply an adapter first).")
    if scheduler is not None and optimizer is None:
        raise RankwiseError("a scheduler needs its optimizer: pass optimizer= with scheduler=.")
    sharded = _is_fsdp2_sharded(model)
    if sharded:  # checkpoints: model gathered to one folder, optimizer state one file per process
        if optimizer is None:
            raise RankwiseError("an FSDP-sharded model needs its optimizer built on the sharded parameters: "
                                "pass optimizer=.")
        # transformers' own marker for a model sharded before the Trainer (from_pretrained(distributed_config=...)
        # sets it): the Trainer then neither wraps it in DDP nor re-shards it, and keeps any replicated parameter
        # in sync. Set here because rankwise shards with fully_shard itself (rankwise.cli.train_cmd).
        model._is_distributed_loading_by_transformers = True
    scratch = None
    out_dir = cfg.checkpoints
    if out_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="rankwise-trainer-")
        out_dir = scratch.name
    resume: str | bool | None = cfg.resume
    if resume == "last":
        resume = True
    elif resume is not None and not os.path.isdir(resume):
        raise RankwiseError(f"--resume {resume}: no such checkpoint folder.")
    replaces = any(getattr(cb, "replaces_parameters", False) for cb in callbacks)
    args = training_arguments(cfg, lr, out_dir, progress=progress, find_unused_parameters=True if replaces else None)
    meter = _Meter()
    cbs = [*callbacks, meter]
    if _is_adalora(model):
        cbs.append(_AdaLoraSchedule(model))
    if sharded:  # the Trainer refuses optimizer checkpoints of a model sharded before it; RankwiseTrainer writes them
        args.save_only_model = True  # (one file per process, rankwise.train.fsdp_checkpoint): pass its check, then
    trainer = RankwiseTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator or lm_collate,
                              optimizers=(optimizer, scheduler), callbacks=cbs)
    if sharded:
        trainer.args.save_only_model = False  # ... save optimizer, scheduler and RNG states as for any other run
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_LossBar(progress and args.should_save, desc or f"train {cfg.task}"))
    from rankwise.evaluation.memory import PeakMemory

    t0 = time.perf_counter()
    try:
        with PeakMemory(args.device) as mem:
            out = trainer.train(resume_from_checkpoint=resume)
    except ValueError as exc:
        if "checkpoint" in str(exc).lower() and not isinstance(exc, RankwiseError):
            raise RankwiseError(f"cannot resume: {exc}") from exc
        raise
    finally:
        if scratch is not None:
            scratch.cleanup()
    seconds = time.perf_counter() - t0
    model.eval()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    steps = int(out.global_step)
    return TrainResult(steps=steps, losses=losses, seconds=seconds, s_per_step=seconds / max(1, meter.steps),
                       peak_memory_mb=mem.peak_mb, peak_memory_delta_mb=mem.extra_mb, memory_kind=mem.kind,
                       examples=steps * cfg.batch_size * cfg.grad_accum * args.world_size,
                       step_seconds=meter.step_seconds,
                       state=None if meter.state is None else meter.state.to_dict(), peak_state_bytes=meter.peak_state)


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, texts: list[str], labels: list[int], seq_len: int = 256,
             batch_size: int = 16, progress: bool = True) -> float:
    """Fraction of ``texts`` whose argmax logit equals the label (texts truncated to ``seq_len`` tokens)."""
    from rankwise.progress import progress as progress_bar

    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in progress_bar(range(0, len(texts), batch_size), desc="accuracy", unit="batch", enabled=progress):
        enc = tokenizer(texts[i: i + batch_size], truncation=True, max_length=seq_len, padding=True,
                        return_tensors="pt").to(device)
        pred = model(**enc).logits.argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[i: i + batch_size])).sum())
    return correct / max(1, len(texts))


def evaluate(model: nn.Module, tokenizer, cfg: TrainConfig, split: str = "test",
             progress: bool = True) -> dict[str, Any]:
    """Held-out metric on ``split``: perplexity (lm; ``eval_tokens`` tokens) or accuracy (classify)."""
    if cfg.task == "lm":
        from rankwise.evaluation.perplexity import perplexity
        from rankwise.io.texts import load_text

        text = load_text(cfg.data, split)
        res = perplexity(model, tokenizer, text, seq_len=cfg.eval_seq_len, max_tokens=cfg.eval_tokens,
                         name=f"{cfg.data}:{split}", progress=progress)
        return {"metric": "perplexity", "value": res.perplexity, **res.to_dict()}
    from rankwise.io.texts import load_labelled

    texts, labels, names = load_labelled(cfg.data, split)
    if cfg.max_eval:
        texts, labels = texts[: cfg.max_eval], labels[: cfg.max_eval]
    acc = accuracy(model, tokenizer, texts, labels, seq_len=cfg.seq_len, progress=progress)
    return {"metric": "accuracy", "value": acc, "examples": len(texts), "labels": names}

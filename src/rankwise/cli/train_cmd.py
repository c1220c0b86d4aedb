"""``rankwise train``: train a causal LM with AdamW, GaLore (svd / randomized / dct) or Fira, optionally with
a rank-shaping callback (TRP, Cuttlefish), then report PTB-test perplexity and save the model.

Examples::

    rankwise train --optimizer galore --from-scratch --data ptb --steps 5 --out out/tr
    rankwise train smollm2-135m --optimizer fira --rank 64 --steps 50 --lr 1e-4 --out out/fira
    rankwise train --optimizer adamw --callback cuttlefish --from-scratch --steps 40 --out out/cf
    rankwise train --regime sltrain --optimizer adamw --from-scratch --steps 40 --out out/sl --export-dense out/sl-d
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rankwise.config import add_config_arguments, config_from_args, positive_int, whole_int
from rankwise.train.config import TrainRunConfig, build_callback, build_optimizer, build_regime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rankwise train``: the :class:`TrainRunConfig` fields, plus output options."""
    parser.add_argument("model", nargs="?", default=None, help="built-in name or model folder (default smollm2-135m)")
    parser.add_argument("--steps", type=whole_int("--steps"), required=True, help="optimiser steps")
    add_config_arguments(parser, TrainRunConfig, skip=("steps",))
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--export-dense", default=None, metavar="DIR",
                        help="also write a plain transformers folder (regime layers multiplied out) here")
    parser.add_argument("--json", default=None, help="also write the run summary as JSON here ('-' = stdout)")
    parser.add_argument("--threads", type=positive_int("--threads"), default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy shared machine)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (deprecated: use --quiet, which also silences messages)")
    parser.add_argument("--checkpoints", default=None, metavar="DIR",
                        help="folder for Trainer checkpoints (checkpoint-N/: weights, optimizer, scheduler, RNG, "
                             "callback state)")
    parser.add_argument("--save-steps", type=positive_int("--save-steps"), default=None, metavar="N",
                        help="write a Trainer checkpoint every N steps into --checkpoints")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="resume from a Trainer checkpoint folder ('last': the newest in --checkpoints); "
                             "start from the same model and options: layers a callback factorised are rebuilt")


def _check(args: argparse.Namespace, config: TrainRunConfig) -> None:
    from rankwise.errors import RankwiseError
    from rankwise.io.atomic import check_writable

    p = check_writable(args.out, is_dir=True)
    if p.exists() and not args.overwrite:
        raise RankwiseError(f"output folder {p} already exists; pass --overwrite or another --out.")
    if getattr(args, "export_dense", None):
        from pathlib import Path

        d = check_writable(args.export_dense, is_dir=True)
        if d.resolve() == Path(p).resolve():
            raise RankwiseError("--export-dense must differ from --out.")
        if d.exists() and not args.overwrite:
            raise RankwiseError(f"output folder {d} already exists; pass --overwrite or another --export-dense.")
    save_steps, checkpoints, resume = (getattr(args, k, None) for k in ("save_steps", "checkpoints", "resume"))
    if save_steps and not checkpoints:
        raise RankwiseError("--save-steps needs --checkpoints DIR (where the Trainer writes checkpoint-N/).")
    if resume == "last" and not checkpoints:
        raise RankwiseError("--resume last needs --checkpoints DIR.")
    if resume not in (None, "last"):
        from pathlib import Path

        if not (Path(resume) / "trainer_state.json").is_file():
            raise RankwiseError(f"--resume {resume}: not a Trainer checkpoint folder (no trainer_state.json).")
    if config.fsdp:
        from rankwise.compression.distributed import Dist

        if not Dist.current().enabled:
            raise RankwiseError(
                "--fsdp shards the model over several processes but this is one process without a process group; "
                "launch it with torchrun: torchrun --nproc-per-node 2 -m rankwise train --fsdp ..."
            )


def load_for_training(name: str | None, from_scratch: bool, seed: int) -> tuple[Any, Any]:
    """(model, tokenizer): the pretrained weights, or a seeded random init of the same config."""
    import torch
    import transformers

    from rankwise.io.models import is_rankwise_checkpoint, load_model, load_tokenizer, resolve_model

    path = resolve_model(name)
    tok = load_tokenizer(path)
    if not from_scratch:
        return load_model(path), tok
    if is_rankwise_checkpoint(path):
        from rankwise.errors import RankwiseError

        raise RankwiseError(f"{path} is a factorised rankwise checkpoint; --from-scratch needs a dense model's folder.")
    config = transformers.AutoConfig.from_pretrained(str(path))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tok


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, save; prints a summary."""
    import torch

    from rankwise.cli.common import console, write_json
    from rankwise.compression.distributed import Dist
    from rankwise.io.atomic import atomic_dir, atomic_outputs
    from rankwise.io.checkpoint import factorised_layers
    from rankwise.io.checkpoint import save as save_checkpoint
    from rankwise.train.memory import human_bytes

    config = config_from_args(TrainRunConfig, args)  # validates (one-line errors)
    _check(args, config)
    dist = Dist.current()  # under torchrun: a process group (gloo); process 0 evaluates and writes
    outputs = (atomic_outputs(dirs=[args.out, args.export_dense], files=[args.json],  # put in place together
                              overwrite=args.overwrite) if dist.is_writer else None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)
    model, tok = load_for_training(config.model, config.from_scratch, config.seed)
    lr = config.learning_rate
    callback = build_callback(config)
    if callback is not None:
        callback.check_model(model)
    n_params0 = sum(p.numel() for p in model.parameters())
    regime = build_regime(config)
    regime.prepare(model)  # sltrain / relora / lost: the target matrices become the regime's layers
    if config.fsdp and dist.enabled:
        _shard(model)  # before the optimizer: GaLore's state is built on the row shards
    optimizer = build_optimizer(model, config)
    scheduler = regime.scheduler(optimizer, config.steps)  # relora: the jagged cosine schedule
    t0 = time.perf_counter()
    result = fit(model, tok, config, optimizer, scheduler=scheduler,
                 callbacks=([callback] if callback else []) + regime.callbacks(), world=dist.world,
                 progress=not args.no_progress and dist.is_writer, save_steps=args.save_steps,
                 checkpoints=args.checkpoints, resume=args.resume)
    train_s = time.perf_counter() - t0
    shared = _shared_numbers(result, dist)
    model = _gathered(model, args, dist)
    if not dist.is_writer:
        return 0
    ppl = None
    if config.eval_tokens > 0:
        from rankwise.evaluation.perplexity import perplexity
        from rankwise.io.texts import load_text

        test = load_text("ptb", "test")
        seq = min(config.eval_seq_len, config.eval_tokens)
        ppl = perplexity(model, tok, test, seq_len=seq, max_tokens=config.eval_tokens, name="ptb:test",
                         progress=not args.no_progress)
    layers = factorised_layers(model)
    summary: dict[str, Any] = {
        "optimizer": config.optimizer,
        "projection": config.resolved_projection,
        "rank": None if config.optimizer == "adamw" else config.rank,
        "update_proj_gap": None if config.optimizer == "adamw" else config.update_gap,
        "scale": None if config.optimizer == "adamw" else config.scale,
        "callback": config.callback,
        "regime": regime.summary(model),
        "from_scratch": bool(config.from_scratch),
        "model": str(config.model or "smollm2-135m"),
        "data": config.data,
        "lr": lr,
        "seed": config.seed,
        "train_seconds": train_s,
        "params_before": n_params0,
        "params_after": sum(p.numel() for p in model.parameters()),
        "factorised_layers": len(layers),
        "perplexity": None if ppl is None else ppl.to_dict(),
        "train": result,
        "callback_events": result["events"],
        # machine-readable headline numbers (over all processes)
        "final_loss": shared["final_loss"],
        "steps": result["steps"],
        "tokens_per_second": result["tokens"] * dist.world / train_s if train_s > 0 else None,
        "optimizer_state_bytes_per_rank": shared["state_bytes"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_bytes": shared["peak_memory"],
        "processes": dist.world,
        "parallel": "fsdp" if config.fsdp and dist.enabled else ("ddp" if dist.enabled else None),
    }
    method = (f"train:{config.optimizer}" + (f"+{config.callback}" if config.callback else "")
              + (f"+{config.regime}" if config.regime != "dense" else ""))
    meta = {"method": method, "train": summary}
    with outputs:
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            if layers:
                save_checkpoint(model, tmp, meta=meta, tokenizer=tok, overwrite=True)
            else:
                model.save_pretrained(str(tmp))
                tok.save_pretrained(str(tmp))
            write_json(summary, str(tmp / "train.json"))
        if args.export_dense:
            from rankwise.train.regimes.base import export_dense

            export_dense(model, args.export_dense, tokenizer=tok, overwrite=args.overwrite)
        if args.json:
            write_json(summary, args.json)
    st = result["state"]
    console.print(
        f"[bold]rankwise train[/bold] {config.optimizer}: {result['steps']} steps x {config.batch_size}x"
        f"{config.seq_len} tokens, final loss {result['final_loss']:.3f} (first {result['losses'][0]:.3f}), "
        f"{result['seconds_per_step']:.2f} s/step"
    )
    if st is not None:
        console.print(
            f"optimizer state {human_bytes(st['total'])} (projected matrices {human_bytes(st['projected'])}, "
            f"rest {human_bytes(st['plain'])})"
        )
    if config.callback:
        done = [e for e in result["events"] if e.get("action") == "factorise"]
        console.print(
            f"{config.callback}: {len(done)} layers factorised; parameters {n_params0:,} -> "
            f"{summary['params_after']:,}"
        )
    if ppl is not None:
        console.print(f"PTB-test perplexity {ppl.perplexity:.2f} ({ppl.tokens} tokens, {ppl.windows} windows)")
    console.print(f"saved to {args.out}" + (" (rankwise checkpoint: factorised layers)" if layers else ""))
    return 0


def fit(model: Any, tok: Any, config: TrainRunConfig, optimizer: Any, scheduler: Any = None,
        callbacks: list[Any] | None = None, world: int = 1, progress: bool = True, save_steps: int | None = None,
        checkpoints: str | None = None, resume: str | None = None) -> dict[str, Any]:
    """Train ``model`` on ``config.data`` through the one loop, :func:`rankwise.training.train` (the HF Trainer).

    Data: non-overlapping ``seq_len`` windows of the training text (BOS first) in the Trainer's seeded
    shuffled order; each optimizer step takes ``batch_size`` windows per process (under torchrun the
    processes take consecutive shares of one ``world × batch_size`` global batch), so two runs with the
    same seed see the same batches. Constant learning rate unless ``scheduler`` is given; gradients
    clipped at 1.0. Returns the run record written to ``train.json``'s ``"train"`` (losses, per-step
    seconds, GaLore refresh seconds, optimizer-state bytes, callback events). ``save_steps``,
    ``checkpoints`` and ``resume`` are the Trainer's checkpointing (:class:`rankwise.training.TrainConfig`).
    """
    from rankwise.io.texts import load_text
    from rankwise.training import LMWindows, TrainConfig, lm_collate
    from rankwise.training import train as trainer_train

    callbacks = list(callbacks or [])
    device = next(model.parameters()).device  # train where the model is (the Trainer does not move it)
    tcfg = TrainConfig(task="lm", data=config.data, steps=config.steps, lr=config.learning_rate,
                       batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed,
                       weight_decay=config.weight_decay, grad_clip=1.0, lr_schedule="constant",
                       device="cpu" if device.type == "cpu" else str(device), save_steps=save_steps,
                       checkpoints=checkpoints, resume=resume)
    dataset = LMWindows(tok, load_text(config.data, "train"), config.seq_len,
                        need_windows=config.steps * config.batch_size * world)
    res = trainer_train(model, dataset, tcfg, collator=lm_collate, lr=config.learning_rate, optimizer=optimizer,
                        scheduler=scheduler, callbacks=callbacks, progress=progress,
                        desc=f"train {config.optimizer}")
    refresh = getattr(optimizer, "refresh_seconds", None)
    losses = res.losses
    tail = losses[-min(5, len(losses)):] if losses else []
    times = sorted(res.step_seconds)
    return {
        "steps": res.steps,
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "tokens": res.steps * config.batch_size * config.seq_len,  # this process's tokens
        "losses": losses,
        "step_seconds": res.step_seconds,
        "refresh_seconds": list(refresh) if isinstance(refresh, list) else [],
        "state": res.state,
        "peak_state_bytes": res.peak_state_bytes,
        "events": [e for cb in callbacks for e in getattr(cb, "events", [])],
        "final_loss": float(sum(tail) / len(tail)) if tail else float("nan"),  # mean of the last min(5, steps)
        "seconds_per_step": float(times[len(times) // 2]) if times else float("nan"),  # median
    }


def _shard(model: Any) -> None:
    """FSDP2 in place: one ``fully_shard`` unit per transformer block, then the root (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    from rankwise.compression.runner import find_blocks
    from rankwise.surgery.targets import find_targets

    blocks = find_blocks(model, find_targets(model))
    for block in blocks.modules if blocks is not None else []:
        fully_shard(block)  # one all-gather per block in forward/backward
    fully_shard(model)


def _shared_numbers(result: Any, dist: Any) -> dict[str, Any]:
    """Final loss averaged over the processes; optimizer-state bytes and peak memory: the largest process."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        peak = int(torch.cuda.max_memory_allocated())
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    state = int(result["state"]["total"]) if result["state"] is not None else 0
    tail = torch.tensor([result["final_loss"]], dtype=torch.float64)
    dist.all_reduce_(tail)
    big = torch.tensor([state, peak], dtype=torch.float64)
    dist.all_reduce_(big, op="max")
    return {"final_loss": float(tail) / dist.world, "state_bytes": int(big[0]), "peak_memory": int(big[1])}


def _gathered(model: Any, args: argparse.Namespace, dist: Any) -> Any:
    """A plain, whole model to evaluate and save on process 0 (FSDP shards gathered)."""
    if not dist.enabled or not args.fsdp:
        return model  # the Trainer wrapped the DDP copy, not the model
    import transformers

    from rankwise.train.sharded import is_sharded

    state = {k: (v.full_tensor() if is_sharded(v) else v).detach() for k, v in model.state_dict().items()}
    if not dist.is_writer:
        return model
    whole = transformers.AutoModelForCausalLM.from_config(model.config)
    whole.load_state_dict(state)
    return whole

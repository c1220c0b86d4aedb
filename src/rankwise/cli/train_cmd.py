"""``rankwise train``: train a causal LM with AdamW, GaLore (svd / randomized / dct) or Fira, optionally with
a rank-shaping callback (TRP, Cuttlefish), then report PTB-test perplexity and save the model.

Examples::

    rankwise train --optimizer galore --from-scratch --data ptb --steps 5 --out out/tr
    rankwise train smollm2-135m --optimizer fira --rank 64 --steps 50 --lr 1e-4 --out out/fira
    rankwise train --optimizer adamw --callback cuttlefish --from-scratch --steps 40 --out out/cf
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rankwise.cli.common import positive_int

OPTIMIZERS = ("adamw", "galore", "galore-dct", "fira")
CALLBACKS = ("trp", "cuttlefish")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rankwise train``."""
    parser.add_argument("model", nargs="?", default=None, help="built-in name or model folder (default smollm2-135m)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="galore", help="optimiser (default galore)")
    parser.add_argument(
        "--projection", choices=("svd", "randomized", "dct"), default=None,
        help="projection of the low-rank optimisers (default: svd; dct for galore-dct)",
    )
    parser.add_argument("--rank", type=int, default=128, help="projection rank (default 128)")
    parser.add_argument("--update-gap", type=int, default=200, help="steps between projection refreshes (default 200)")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore scale α of the low-rank update (0.25)")
    parser.add_argument("--targets", default=None, help="regex of module names in the low-rank group (default all)")
    parser.add_argument("--callback", choices=CALLBACKS, default=None, help="rank-shaping callback")
    parser.add_argument("--trp-lam", type=float, default=1e-4, help="TRP nuclear-norm step λ per step (1e-4)")
    parser.add_argument("--trp-every", type=int, default=10, help="TRP truncation period in steps (10)")
    parser.add_argument("--trp-energy", type=float, default=0.99, help="TRP energy kept at truncation (0.99)")
    parser.add_argument("--cf-check-every", type=int, default=5, help="Cuttlefish stable-rank check period (5)")
    parser.add_argument("--cf-tol", type=float, default=0.02, help="Cuttlefish relative change counted as settled")
    parser.add_argument("--from-scratch", action="store_true", help="random init from the model's config (seeded)")
    parser.add_argument("--data", default="ptb", help="training text: ptb, bbc or a .txt file (train split)")
    parser.add_argument("--steps", type=int, required=True, help="optimiser steps")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (1e-3 from scratch, else 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (0)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per step (4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window (256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the data order (0)")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="PTB-test tokens for perplexity (2048; 0 skips)")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window length (512)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--json", default=None, help="also write the run summary as JSON here ('-' = stdout)")
    parser.add_argument("--threads", type=positive_int("--threads"), default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is faster on a busy shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimizer state over the processes (FSDP2); launch "
                        "with torchrun --nproc-per-node N -m rankwise train --fsdp ... (under torchrun without "
                        "--fsdp the processes train with DDP)")


def _check(args: argparse.Namespace) -> None:
    from rankwise.errors import RankwiseError
    from rankwise.io.atomic import check_writable
    from rankwise.train.projector import check_gap, check_rank

    if args.steps < 1:
        raise RankwiseError(f"--steps must be at least 1, got {args.steps}.")
    if args.optimizer != "adamw":
        check_rank(args.rank)
        check_gap(args.update_gap)
    if args.lr is not None and args.lr <= 0:
        raise RankwiseError(f"--lr must be positive, got {args.lr}.")
    for flag, value in (("--weight-decay", args.weight_decay), ("--eval-tokens", args.eval_tokens)):
        if value < 0:
            raise RankwiseError(f"{flag} must be 0 or more, got {value}.")
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                        ("--eval-seq-len", args.eval_seq_len)):
        if value < 1:
            raise RankwiseError(f"{flag} must be at least 1, got {value}.")
    p = check_writable(args.out, is_dir=True)
    if p.exists() and not args.overwrite:
        raise RankwiseError(f"output folder {p} already exists; pass --overwrite or another --out.")
    if args.fsdp:
        from rankwise.compression.distributed import Dist

        if not Dist.current().enabled:
            raise RankwiseError(
                "--fsdp shards the model over several processes but this is one process without a process group; "
                "launch it with torchrun: torchrun --nproc-per-node 2 -m rankwise train --fsdp ..."
            )
        if args.callback:
            raise RankwiseError(
                f"--callback {args.callback} takes SVDs of whole weight matrices, which --fsdp never holds; run it "
                "under torchrun without --fsdp (DDP) or in one process."
            )


def build_optimizer(model: Any, args: argparse.Namespace, lr: float) -> Any:
    """The optimiser ``--optimizer`` names, over ``model``'s trainable parameters."""
    import torch

    from rankwise.train.galore import GaLoreAdamW, galore_param_groups

    if args.optimizer == "adamw":
        return torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-6, weight_decay=args.weight_decay
        )
    projection = args.projection or ("dct" if args.optimizer == "galore-dct" else "svd")
    groups = galore_param_groups(
        model, rank=args.rank, update_proj_gap=args.update_gap, scale=args.scale, targets=args.targets,
        projection=projection, fira=args.optimizer == "fira",
    )
    return GaLoreAdamW(groups, lr=lr, weight_decay=args.weight_decay, seed=args.seed)


def build_callback(args: argparse.Namespace) -> Any:
    """The ``--callback`` object (or None)."""
    from rankwise.train.callbacks import TRP, Cuttlefish

    if args.callback == "trp":
        return TRP(lam=args.trp_lam, every=args.trp_every, energy=args.trp_energy, targets=args.targets)
    if args.callback == "cuttlefish":
        return Cuttlefish(check_every=args.cf_check_every, tol=args.cf_tol, targets=args.targets)
    return None


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
    from rankwise.io.texts import load_text
    from rankwise.train.loop import train_loop, training_windows
    from rankwise.train.memory import human_bytes

    _check(args)
    dist = Dist.current()  # under torchrun: a process group (gloo); process 0 evaluates and writes
    outputs = (atomic_outputs(dirs=[args.out], files=[args.json], overwrite=args.overwrite)  # put in place together
               if dist.is_writer else None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_for_training(args.model, args.from_scratch, args.seed)
    lr = args.lr if args.lr is not None else (1e-3 if args.from_scratch else 1e-4)
    callback = build_callback(args)
    if callback is not None:
        callback.check_model(model)
    n_params0 = sum(p.numel() for p in model.parameters())
    trained = _parallel(model, args, dist, callback is not None)
    optimizer = build_optimizer(model, args, lr)
    text = load_text(args.data, "train")
    # one process's batch of batch_size windows per step; N processes take interleaved shares of N·batch_size
    windows = training_windows(tok, text, args.steps, args.batch_size * dist.world, args.seq_len, seed=args.seed,
                               name=args.data)
    if dist.enabled:
        windows = windows.view(args.steps, args.batch_size * dist.world, -1)[:, dist.rank :: dist.world]
        windows = windows.reshape(-1, args.seq_len)
    t0 = time.perf_counter()
    result = train_loop(
        trained, optimizer, windows, args.batch_size, callbacks=[callback] if callback else [],
        progress=not args.no_progress and dist.is_writer, desc=f"train {args.optimizer}",
    )
    train_s = time.perf_counter() - t0
    shared = _shared_numbers(result, dist)
    model = _gathered(model, trained, args, dist)
    if not dist.is_writer:
        return 0
    ppl = None
    if args.eval_tokens > 0:
        from rankwise.evaluation.perplexity import perplexity

        test = load_text("ptb", "test")
        seq = min(args.eval_seq_len, args.eval_tokens)
        ppl = perplexity(model, tok, test, seq_len=seq, max_tokens=args.eval_tokens, name="ptb:test",
                         progress=not args.no_progress)
    layers = factorised_layers(model)
    summary: dict[str, Any] = {
        "optimizer": args.optimizer,
        "projection": None if args.optimizer == "adamw" else (args.projection or
                                                              ("dct" if args.optimizer == "galore-dct" else "svd")),
        "rank": None if args.optimizer == "adamw" else args.rank,
        "update_proj_gap": None if args.optimizer == "adamw" else args.update_gap,
        "scale": None if args.optimizer == "adamw" else args.scale,
        "callback": args.callback,
        "from_scratch": bool(args.from_scratch),
        "model": str(args.model or "smollm2-135m"),
        "data": args.data,
        "lr": lr,
        "seed": args.seed,
        "train_seconds": train_s,
        "params_before": n_params0,
        "params_after": sum(p.numel() for p in model.parameters()),
        "factorised_layers": len(layers),
        "perplexity": None if ppl is None else ppl.to_dict(),
        "train": result.to_dict(),
        "callback_events": result.events,
        # machine-readable headline numbers (over all processes)
        "final_loss": shared["final_loss"],
        "steps": result.steps,
        "tokens_per_second": result.tokens * dist.world / train_s if train_s > 0 else None,
        "optimizer_state_bytes_per_rank": shared["state_bytes"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_bytes": shared["peak_memory"],
        "processes": dist.world,
        "parallel": "fsdp" if args.fsdp and dist.enabled else ("ddp" if dist.enabled else None),
    }
    meta = {"method": f"train:{args.optimizer}" + (f"+{args.callback}" if args.callback else ""), "train": summary}
    with outputs:
        with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
            if layers:
                save_checkpoint(model, tmp, meta=meta, tokenizer=tok, overwrite=True)
            else:
                model.save_pretrained(str(tmp))
                tok.save_pretrained(str(tmp))
            write_json(summary, str(tmp / "train.json"))
        if args.json:
            write_json(summary, args.json)
    st = result.state
    console.print(
        f"[bold]rankwise train[/bold] {args.optimizer}: {result.steps} steps x {args.batch_size}x{args.seq_len} "
        f"tokens, final loss {result.final_loss:.3f} (first {result.losses[0]:.3f}), "
        f"{result.seconds_per_step:.2f} s/step"
    )
    if st is not None:
        console.print(
            f"optimizer state {human_bytes(st.total)} (projected matrices {human_bytes(st.projected)}, "
            f"rest {human_bytes(st.plain)})"
        )
    if args.callback:
        done = [e for e in result.events if e.get("action") == "factorise"]
        console.print(
            f"{args.callback}: {len(done)} layers factorised; parameters {n_params0:,} -> "
            f"{summary['params_after']:,}"
        )
    if ppl is not None:
        console.print(f"PTB-test perplexity {ppl.perplexity:.2f} ({ppl.tokens} tokens, {ppl.windows} windows)")
    console.print(f"saved to {args.out}" + (" (rankwise checkpoint: factorised layers)" if layers else ""))
    return 0


def _parallel(model: Any, args: argparse.Namespace, dist: Any, has_callback: bool) -> Any:
    """The module the loop trains: ``model`` itself, sharded in place (--fsdp), or wrapped in DDP."""
    if not dist.enabled:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        from rankwise.compression.runner import find_blocks
        from rankwise.surgery.targets import find_targets

        blocks = find_blocks(model, find_targets(model))
        for block in blocks.modules if blocks is not None else []:
            fully_shard(block)  # one all-gather per block in forward/backward
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # a callback that factorises layers leaves their old weights unused (rankwise.train.callbacks)
    return DistributedDataParallel(model, find_unused_parameters=has_callback)


def _shared_numbers(result: Any, dist: Any) -> dict[str, Any]:
    """Final loss averaged over the processes; optimizer-state bytes and peak memory: the largest process."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        peak = int(torch.cuda.max_memory_allocated())
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    state = int(result.state.total) if result.state is not None else 0
    tail = torch.tensor([result.final_loss], dtype=torch.float64)
    dist.all_reduce_(tail)
    big = torch.tensor([state, peak], dtype=torch.float64)
    dist.all_reduce_(big, op="max")
    return {"final_loss": float(tail) / dist.world, "state_bytes": int(big[0]), "peak_memory": int(big[1])}


def _gathered(model: Any, trained: Any, args: argparse.Namespace, dist: Any) -> Any:
    """A plain, whole model to evaluate and save on process 0 (FSDP shards gathered; DDP unwrapped)."""
    if not dist.enabled:
        return model
    if not args.fsdp:
        return trained.module
    import transformers

    from rankwise.train.sharded import is_sharded

    state = {k: (v.full_tensor() if is_sharded(v) else v).detach() for k, v in model.state_dict().items()}
    if not dist.is_writer:
        return model
    whole = transformers.AutoModelForCausalLM.from_config(model.config)
    whole.load_state_dict(state)
    return whole

"""``rankwise tune``: fine-tune a model with an adapter (native or through PEFT), evaluate, save, merge, export.

Training runs through the HF Trainer (:mod:`rankwise.training`); the options are
built from :class:`~rankwise.tune.AdapterConfig` and
:class:`~rankwise.training.TrainConfig`, whose defaults are the CLI's.

Examples::

    rankwise tune minilm-l6 --method lora-xs --task classify --data bbc --epochs 1 --out out/t
    rankwise tune --method dora --data ptb --steps 2 --out out/d --export-peft out/p
    rankwise tune --method dylora --rank 8 --eval-rank 4 --data ptb --out out/dy
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from rankwise.cli.common import positive_int
from rankwise.errors import RankwiseError

DEFAULT_LR = 2e-4
LR_MULTIPLIER = {"svfit": 10.0, "loldu": 10.0, "lora-xs": 10.0}
"""Methods that train only singular values / a diagonal / an r×r core need a larger step (their papers)."""


def default_lr(method: str) -> float:
    """The learning rate ``rankwise tune`` uses when --lr is not given."""
    return DEFAULT_LR * LR_MULTIPLIER.get(method, 1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rankwise.config import add_config_arguments
    from rankwise.training import TrainConfig
    from rankwise.tune.config import AdapterConfig

    p.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_DIR",
                   help="built-in name (smollm2-135m, minilm-l6), HF folder, or rankwise checkpoint "
                        "(for welore-lrc / heal); default smollm2-135m, or minilm-l6 with --task classify")
    add_config_arguments(p, AdapterConfig)
    add_config_arguments(p, TrainConfig)
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--out", required=True, help="folder for the adapter (rankwise_adapter.json + the tensors; "
                                                "PEFT-backed methods: PEFT's own files)")
    p.add_argument("--merge", default=None, metavar="DIR",
                   help="also write the merged dense model as a standard HF folder")
    p.add_argument("--export-peft", default=None, metavar="DIR",
                   help="also write a PEFT adapter folder (lora, pissa, lora-ga and the PEFT-backed methods)")
    p.add_argument("--threads", type=positive_int("--threads"), default=None,
                   help="CPU threads for torch (default: torch's; 1 is often faster on an oversubscribed machine)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--json", default=None, metavar="PATH", help="write the run summary as JSON ('-' = stdout)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rankwise.cli.common import console, write_json
    from rankwise.config import config_from_args
    from rankwise.io.models import is_rankwise_checkpoint, load_model, load_tokenizer, resolve_model
    from rankwise.training import TrainConfig, ensure_pad_token, evaluate, init_batches, make_dataset, train
    from rankwise.tune import (
        PEFT_EXPORTABLE,
        AdapterConfig,
        apply,
        export_peft,
        merge_and_unload,
        save_adapter,
        trainable_parameters,
    )
    from rankwise.tune.registry import DATA_INIT_METHODS

    # -- validate everything before the slow parts ------------------------------------------------
    tcfg = config_from_args(TrainConfig, args)
    cfg = config_from_args(AdapterConfig, args, seed=tcfg.seed, total_steps=tcfg.total_steps_hint,
                           modules_to_save="^(classifier|score)$" if tcfg.task == "classify" else None)
    lr = tcfg.lr if tcfg.lr is not None else default_lr(cfg.method)
    if args.export_peft and cfg.method not in PEFT_EXPORTABLE:
        raise RankwiseError(
            f"--export-peft supports {', '.join(PEFT_EXPORTABLE)} only; PEFT cannot represent a {cfg.method} "
            "adapter: use --merge DIR to write a dense folder instead."
        )
    from rankwise.tune.peft_backend import PEFT_BUILDERS

    if cfg.method in PEFT_BUILDERS:  # loftq: bitsandbytes + CUDA, said before the model loads
        PEFT_BUILDERS[cfg.method].check_environment()
    outs = [o for o in (args.out, args.merge, args.export_peft) if o]
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise RankwiseError("--out, --merge and --export-peft must be different folders.")
    from rankwise.io.atomic import atomic_outputs

    # every output checked now, written under temporary names and put in place together at the end
    outputs = atomic_outputs(dirs=outs, files=[args.json], overwrite=args.overwrite)
    labels: list[str] | None = None
    if tcfg.task == "classify":
        from rankwise.io.texts import load_labelled

        _, _, labels = load_labelled(tcfg.data, "train")  # one-line error when the data has no labels
    model_name = args.model or ("minilm-l6" if tcfg.task == "classify" else None)
    model_path = resolve_model(model_name)
    from rankwise.tune.registry import LOWRANK_METHODS

    if cfg.method in LOWRANK_METHODS and not is_rankwise_checkpoint(model_path):
        raise RankwiseError(
            f"{cfg.method} trains the factors of a compressed model: pass a `rankwise compress` output folder as "
            f"MODEL_OR_DIR (rankwise compress --out C, then rankwise tune C --method {cfg.method} ...), not "
            f"{model_name or 'smollm2-135m'}."
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(tcfg.seed)

    # -- model and data ---------------------------------------------------------------------------
    with console.status(f"loading {model_name or 'smollm2-135m'} …"):
        tok = load_tokenizer(model_name)
        if tcfg.task == "classify":
            if is_rankwise_checkpoint(model_path):
                raise RankwiseError("--task classify needs a plain HF model folder, not a compressed checkpoint.")
            model = load_model(model_name, task="classify", num_labels=len(labels),
                               id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
            ensure_pad_token(model, tok)
        else:
            model = load_model(model_name, task="causal-lm")
    dataset, collator = make_dataset(tok, tcfg)
    if cfg.total_steps is None:  # an epoch budget: adalora's schedule needs the step count
        per_epoch = math.ceil(len(dataset) / tcfg.batch_size) // tcfg.grad_accum
        cfg = dataclasses.replace(cfg, total_steps=max(1, math.ceil(tcfg.epochs * max(1, per_epoch))))
    data = init_batches(tok, tcfg, cfg.init_batches) if cfg.method in DATA_INIT_METHODS else None
    t0 = time.perf_counter()
    model = apply(model, cfg, data=data)
    init_s = time.perf_counter() - t0
    n_train, n_total = trainable_parameters(model), sum(p.numel() for p in model.parameters())
    console.print(f"[bold]{cfg.method}[/bold]: {len(model.rankwise_adapter['targets'])} layers adapted in "
                  f"{init_s:.1f} s; trainable {n_train:,} of {n_total:,} parameters "
                  f"({100 * n_train / n_total:.3f} %)")

    # -- train + evaluate -------------------------------------------------------------------------
    result = train(model, dataset, tcfg, collator=collator, lr=lr)
    ev = None if args.no_eval else evaluate(model, tok, tcfg)

    # -- outputs (each atomic) --------------------------------------------------------------------
    record = {
        "task": tcfg.task, "data": tcfg.data, "labels": labels,
        "num_labels": None if labels is None else len(labels),
        "training": {**result.to_dict(), "lr": lr, "batch_size": tcfg.batch_size, "grad_accum": tcfg.grad_accum,
                     "seq_len": tcfg.seq_len, "seed": tcfg.seed, "precision": tcfg.precision,
                     "init_seconds": init_s},
        "eval": ev,
    }
    summary = {"method": cfg.method, "trainable_parameters": n_train, "total_parameters": n_total, **record,
               "out": args.out, "merge": args.merge, "export_peft": args.export_peft}
    with outputs:
        save_adapter(model, args.out, overwrite=args.overwrite, extra=record)
        if args.export_peft:
            export_peft(model, args.export_peft, overwrite=args.overwrite)
        if args.merge:
            from rankwise.io.checkpoint import export_dense

            plain = merge_and_unload(model)
            export_dense(plain, args.merge, tokenizer=tok, overwrite=args.overwrite)
        if args.json and args.json != "-":
            write_json(summary, args.json)
    rank_txt = cfg.rank if cfg.rank is not None else ("energy" if cfg.method == "svfit" else 8)
    if cfg.method == "dylora":
        rank_txt = f"{rank_txt} (eval rank {cfg.eval_rank or cfg.r})"
    tr = result.to_dict()
    metric = "" if ev is None else (
        f"{tcfg.data}-test perplexity {ev['value']:.2f} ({ev['tokens']} tokens)" if ev["metric"] == "perplexity"
        else f"{tcfg.data}-test accuracy {ev['value']:.4f} ({ev['examples']} texts)")
    console.print(
        f"rankwise tune: {cfg.method} r={rank_txt}"
        f" · trainable {n_train:,} params ({100 * n_train / n_total:.3f} %) · {result.steps} steps at lr {lr:g}, "
        f"loss {tr['first_loss']:.4f}→{tr['final_loss']:.4f}, "
        f"{result.s_per_step:.2f} s/step · {metric} · adapter in {args.out}"
        + (f" · merged in {args.merge}" if args.merge else "")
        + (f" · PEFT in {args.export_peft}" if args.export_peft else "")
    )
    if args.json == "-":
        write_json(summary, args.json)
    return 0

"""``rankwise tune``: fine-tune a model with a spectral adapter, evaluate, save, merge, export.

Examples::

    rankwise tune minilm-l6 --method svfit --task classify --data bbc --epochs 1 --out out/t
    rankwise tune --method lora --task lm --data ptb --steps 2 --out out/l --merge out/m --export-peft out/p
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rankwise.cli.common import positive_int
from rankwise.errors import RankwiseError

DEFAULT_LR = 2e-4
LR_MULTIPLIER = {"svfit": 10.0, "loldu": 10.0}
"""Methods whose few parameters are singular values / a diagonal need a larger step (SVFit, LoLDU papers)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL_OR_DIR",
                   help="built-in name (smollm2-135m, minilm-l6), HF folder, or rankwise checkpoint "
                        "(for welore-lrc / heal); default smollm2-135m")
    p.add_argument("--method", default="lora",
                   help="lora, pissa, svfit, salt, sorsa, loldu, welore-lrc, heal (default lora)")
    p.add_argument("--task", default="lm", choices=["lm", "classify"], help="lm (causal LM) or classify")
    p.add_argument("--data", default="ptb", help="ptb, bbc, a .txt file (lm) or a <label>/<n>.txt folder (classify)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default 8; svfit: energy rank)")
    p.add_argument("--alpha", type=float, default=None, help="scale numerator, ΔW = (alpha/rank)·BA (default 2·rank)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="training steps (default 100 when --epochs is not given)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training split")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default 2e-4; svfit and loldu, which train singular values / "
                        "a diagonal, default to 10x that: 2e-3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window / article (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default=None, help="regex of module names to adapt (default: all linear layers)")
    p.add_argument("--exclude", default=None, help="regex of module names to leave alone")
    p.add_argument("--svd", choices=["exact", "randomized"], default=None,
                   help="initial SVDs: exact (default) or randomized")
    p.add_argument("--svd-iters", type=int, default=None,
                   help="power iterations of the randomized SVD (implies --svd randomized)")
    p.add_argument("--energy", type=float, default=0.99, help="svfit: energy fraction that sets the rank")
    p.add_argument("--lora-rank", type=int, default=None, help="salt / heal --heal-mode lora: rank of the LoRA part")
    p.add_argument("--gamma", type=float, default=4e-4, help="sorsa: orthogonality regulariser weight")
    p.add_argument("--heal-mode", choices=["factors", "lora"], default="factors",
                   help="heal: train the factors (default) or a LoRA beside them")
    p.add_argument("--dropout", type=float, default=0.0, help="adapter dropout")
    p.add_argument("--max-train", type=int, default=None, help="classify: use N training texts")
    p.add_argument("--max-eval", type=int, default=None, help="classify: evaluate on N test texts")
    p.add_argument("--eval-tokens", type=int, default=4096, help="lm: perplexity token budget (default 4096)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--out", required=True, help="folder for the adapter (adapter.safetensors + rankwise_adapter.json)")
    p.add_argument("--merge", default=None, metavar="DIR",
                   help="also write the merged dense model as a standard HF folder")
    p.add_argument("--export-peft", default=None, metavar="DIR", help="also write a PEFT LoRA folder (lora, pissa)")
    p.add_argument("--threads", type=positive_int("--threads"), default=None,
                   help="CPU threads for torch (default: torch's; 1 is often faster on an oversubscribed machine)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--json", default=None, metavar="PATH", help="write the run summary as JSON ('-' = stdout)")


def _check_out(path: str | None, overwrite: bool) -> None:
    from rankwise.io.atomic import check_writable

    if path is None:
        return
    p = check_writable(path, is_dir=True)
    if p.exists() and not overwrite:
        raise RankwiseError(f"output folder {p} already exists; pass --overwrite or another path.")


def run(args: argparse.Namespace) -> int:
    import torch

    from rankwise.cli.common import console, write_json
    from rankwise.io.models import is_rankwise_checkpoint, load_model, load_tokenizer, resolve_model
    from rankwise.tune import (
        PEFT_EXPORTABLE,
        AdapterConfig,
        apply,
        export_peft,
        merge_and_unload,
        save_adapter,
        trainable_parameters,
    )
    from rankwise.tune.trainer import TrainConfig, ensure_pad_token, evaluate, make_data, train

    # -- validate everything before the slow parts ------------------------------------------------
    svd = args.svd or ("randomized" if args.svd_iters is not None else "exact")
    cfg = AdapterConfig(
        method=args.method, rank=args.rank, alpha=args.alpha, targets=args.targets, exclude=args.exclude,
        modules_to_save="^(classifier|score)$" if args.task == "classify" else None,
        dropout=args.dropout, svd=svd, svd_iters=2 if args.svd_iters is None else args.svd_iters,
        energy=args.energy, lora_rank=args.lora_rank, gamma=args.gamma, heal_mode=args.heal_mode, seed=args.seed,
    ).validate()
    lr = args.lr if args.lr is not None else DEFAULT_LR * LR_MULTIPLIER.get(cfg.method, 1.0)
    tcfg = TrainConfig(task=args.task, data=args.data, steps=args.steps, epochs=args.epochs, lr=lr,
                       batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                       max_train=args.max_train, max_eval=args.max_eval, eval_tokens=args.eval_tokens).validate()
    if args.export_peft and cfg.method not in PEFT_EXPORTABLE:
        raise RankwiseError(
            f"--export-peft supports {', '.join(PEFT_EXPORTABLE)} only; PEFT cannot represent a {cfg.method} "
            "adapter: use --merge DIR to write a dense folder instead."
        )
    outs = [o for o in (args.out, args.merge, args.export_peft) if o]
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise RankwiseError("--out, --merge and --export-peft must be different folders.")
    for o in outs:
        _check_out(o, args.overwrite)
    labels: list[str] | None = None
    if tcfg.task == "classify":
        from rankwise.io.texts import load_labelled

        _, _, labels = load_labelled(tcfg.data, "train")  # one-line error when the data has no labels
    model_path = resolve_model(args.model)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # -- model ------------------------------------------------------------------------------------
    with console.status(f"loading {args.model or 'smollm2-135m'} …"):
        tok = load_tokenizer(args.model)
        if tcfg.task == "classify":
            if is_rankwise_checkpoint(model_path):
                raise RankwiseError("--task classify needs a plain HF model folder, not a compressed checkpoint.")
            model = load_model(args.model, task="classify", num_labels=len(labels),
                               id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
            ensure_pad_token(model, tok)
        else:
            model = load_model(args.model, task="causal-lm")
    t0 = time.perf_counter()
    apply(model, cfg)
    init_s = time.perf_counter() - t0
    n_train, n_total = trainable_parameters(model), sum(p.numel() for p in model.parameters())
    console.print(f"[bold]{cfg.method}[/bold]: {len(model.rankwise_adapter['targets'])} layers adapted in "
                  f"{init_s:.1f} s; trainable {n_train:,} of {n_total:,} parameters "
                  f"({100 * n_train / n_total:.3f} %)")

    # -- train + evaluate -------------------------------------------------------------------------
    data = make_data(tok, tcfg)
    result = train(model, data, tcfg)
    ev = None if args.no_eval else evaluate(model, tok, tcfg)

    # -- outputs (each atomic) --------------------------------------------------------------------
    record = {
        "task": tcfg.task, "data": tcfg.data, "labels": labels,
        "num_labels": None if labels is None else len(labels),
        "training": {**result.to_dict(), "lr": tcfg.lr, "batch_size": tcfg.batch_size, "seq_len": tcfg.seq_len,
                     "seed": tcfg.seed, "init_seconds": init_s},
        "eval": ev,
    }
    save_adapter(model, args.out, overwrite=args.overwrite, extra=record)
    if args.export_peft:
        export_peft(model, args.export_peft, overwrite=args.overwrite)
    if args.merge:
        from rankwise.io.checkpoint import export_dense

        merge_and_unload(model)
        export_dense(model, args.merge, tokenizer=tok, overwrite=args.overwrite)
    rank_txt = cfg.rank if cfg.rank is not None else ("energy" if cfg.method == "svfit" else 8)
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
    if args.json:
        write_json({"method": cfg.method, "trainable_parameters": n_train, "total_parameters": n_total, **record,
                    "out": args.out, "merge": args.merge, "export_peft": args.export_peft}, args.json)
    return 0

"""Benchmark of every rankwise.tune method (native and PEFT-backed) through the one Trainer loop.

Parts (``--parts``, default all but ``heal``), scaled so the whole script fits a shared 2-core CPU box
(defaults below; the flags scale them up):

* ``classify``: BBC 5-way classification on MiniLM-L6 (fresh head trained with the adapter). Reduction
  from the issue's 3 LRs × 2 seeds × every method: ONE base learning rate, chosen for LoRA on a
  *validation* slice of the BBC train split (grid ``--cls-lrs``), then used by every method (× the
  CLI's multiplier for methods that train singular values / diagonals / an r×r core: svfit, loldu,
  lora-xs ×10); one seed; 1 epoch over 64 articles (seq-len 128, batch 8); accuracy on 100 test
  articles. Extra rows: LoRA at r/2 and DyLoRA (trained at r) evaluated at r/2.
* ``lm``: PTB language modelling on SmolLM2-135M, every method at the CLI's default learning rate
  (no search), few steps (``--lm-steps`` of 2×128 tokens), PTB-test perplexity on ``--lm-eval-tokens``.
  The per-step losses give the LoRA-GA goal (steps to reach LoRA's final loss).
* ``parity``: rankwise's dora/olora vs PEFT used by hand (LoraConfig + get_peft_model + the plain
  transformers.Trainer) on the classification setup: max per-step loss difference.
* ``init``: PiSSA init time, PEFT exact / PEFT randomized (``pissa_niter_2``, ``pissa_niter_4``) vs
  rankwise exact / randomized (2 power iterations, 10 oversampling columns), interleaved rounds
  (ratios only: the machine is shared), and how close each randomized init's factors are to the
  exact top-r SVD (relative Frobenius error of the rank-r part, mean over the adapted layers).
* ``heal``: compress SmolLM2 then heal (train the factors), fraction of the perplexity gap recovered.

* ``classify-grid``: the issue's protocol on the classify setup for ``--methods`` (+ LoRA at r/2): every base LR
  of ``--cls-lrs`` × every seed of ``--seeds``; per method the LR with the best mean *validation* accuracy is
  chosen and its mean test accuracy (± sd over seeds) reported.

Excluded from classify/lm: welore-lrc and heal (they need a compressed model: part ``heal``). loftq runs
with alpha = r (its default: PEFT's LoftQ factors carry no 1/scale), through PEFT's ``loftq_init`` on a
CUDA/XPU machine and through rankwise's CPU path of the same algorithm elsewhere (needs bitsandbytes).

    python bench/tune_quality.py                       # everything, reduced protocol (~40 min, 1 thread)
    python bench/tune_quality.py --parts classify,init  # a subset
Writes bench/results/tune_quality.json (bench/_common.write_result) and docs/img/tune_quality.png.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from rankwise.cli.tune_cmd import default_lr  # noqa: E402
from rankwise.io.models import load_model, load_tokenizer  # noqa: E402
from rankwise.io.texts import load_labelled, load_text  # noqa: E402
from rankwise.training import (  # noqa: E402
    LabelledTexts,
    LMWindows,
    TextCollator,
    TrainConfig,
    accuracy,
    evaluate,
    init_batches,
    lm_collate,
    train,
)
from rankwise.tune import AdapterConfig, apply, set_eval_rank, trainable_parameters  # noqa: E402
from rankwise.tune.registry import DATA_INIT_METHODS  # noqa: E402

PICTURE = Path(__file__).resolve().parent.parent / "docs" / "img" / "tune_quality.png"
ALL = ["lora", "pissa", "svfit", "salt", "sorsa", "loldu", "lora-xs", "lora-ga", "dylora",
       "dora", "adalora", "eva", "olora", "corda", "loftq"]


def attach(model, method: str, rank: int, alpha: float, head: str | None, steps: int,
           data: list[dict[str, torch.Tensor]] | None, seed: int = 0, targets: str | None = None
           ) -> tuple[float, Any]:
    """(init seconds, model to train) for a rankwise method or a ``peft-*`` baseline used by hand."""
    t0 = time.perf_counter()
    if method.startswith("peft-"):
        import peft

        from rankwise.surgery import find_targets

        targets = [t.name for t in find_targets(model) if not (head and t.name.startswith(head))]
        init = {"peft-lora": True, "peft-pissa": "pissa", "peft-pissa-rand": "pissa_niter_2",
                "peft-pissa-rand4": "pissa_niter_4"}[method]
        torch.manual_seed(seed)
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                           init_lora_weights=init,
                                                           modules_to_save=[head] if head else None))
    else:
        name, _, variant = method.partition("@")
        cfg = AdapterConfig(method=name, rank=None if name == "svfit" else rank,
                            alpha=None if name == "loftq" else alpha,  # loftq: alpha = r (see AdapterConfig)
                            modules_to_save=f"^{head}$" if head else None, total_steps=steps, seed=seed,
                            targets=targets,
                            svd="randomized" if variant == "rand" else "exact")
        model = apply(model, cfg, data=data if name in DATA_INIT_METHODS else None, progress=False)
    return time.perf_counter() - t0, model


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def table(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [f"| method | trainable params | {metric} | lr | s/step | peak RSS +MB | init s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        val = f"{r[metric]:.4f}" if metric == "accuracy" else f"{r[metric]:.2f}"
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {val} | {r['lr']:g} | "
                     f"{r['s_per_step']:.2f} | {_num(r.get('peak_memory_delta_mb'))} | {r['init_s']:.2f} |")
    return "\n".join(lines)


# -- classification -------------------------------------------------------------------------------
def part_classify(a: argparse.Namespace) -> dict[str, Any]:
    tok = load_tokenizer("minilm-l6")
    texts, labels, names = load_labelled("bbc", "train")
    te_texts, te_labels, _ = load_labelled("bbc", "test")
    te_texts, te_labels = te_texts[: a.cls_eval], te_labels[: a.cls_eval]
    pool = LabelledTexts(texts, labels, seed=0)  # seeded shuffle of the train split
    train_ds = LabelledTexts(pool.texts[: a.cls_train], pool.labels[: a.cls_train], seed=1)
    val_texts = pool.texts[a.cls_train: a.cls_train + a.cls_val]
    val_labels = pool.labels[a.cls_train: a.cls_train + a.cls_val]
    base = load_model("minilm-l6", task="classify", num_labels=len(names))
    head0 = copy.deepcopy(base.classifier.state_dict())
    collate = TextCollator(tok, a.cls_seq_len)
    steps = -(-len(train_ds) // a.cls_batch)
    cfg = TrainConfig(task="classify", data="bbc", epochs=1, batch_size=a.cls_batch, seq_len=a.cls_seq_len,
                      seed=0)
    data = [collate([train_ds[i] for i in range(k * a.cls_batch, min(len(train_ds), (k + 1) * a.cls_batch))])
            for k in range(min(4, steps))]

    def run(method: str, lr: float, rank: int | None = None, evals=((None, "test"),)) -> list[dict[str, Any]]:
        model = copy.deepcopy(base)
        model.classifier.load_state_dict(head0)  # the same fresh head for every run
        r = rank or a.rank
        init_s, model = attach(model, method, r, 2.0 * r, "classifier", steps, data)
        res = train(model, train_ds, cfg, collator=collate, lr=lr, progress=a.progress)
        out = []
        for eval_rank, split in evals:
            if eval_rank is not None:
                set_eval_rank(model, eval_rank)
            xs, ys = (te_texts, te_labels) if split == "test" else (val_texts, val_labels)
            acc = accuracy(model, tok, xs, ys, seq_len=a.cls_seq_len, progress=False)
            label = method if eval_rank is None else f"{method} (eval r={eval_rank})"
            out.append({"method": label, "rank": r, "lr": lr, "split": split, "accuracy": acc, "init_s": init_s,
                        "trainable_parameters": trainable_parameters(model), "losses": res.losses,
                        **res.to_dict()})
            print(f"  cls {label:24s} r={r} lr={lr:.0e} {split} acc={acc:.4f} {res.s_per_step:.2f} s/step "
                  f"init {init_s:.2f}s", file=sys.stderr)
        del model
        gc.collect()
        return out

    # one base LR, chosen for LoRA on the validation slice (never on test); --cls-base-lr reuses a choice
    search = [] if a.cls_base_lr else [run("lora", lr, evals=((None, "val"),))[0] for lr in a.cls_lrs]
    base_lr = a.cls_base_lr or max(search, key=lambda r: r["accuracy"])["lr"]
    rows = []
    for method in a.methods:
        lr = base_lr * default_lr(method) / default_lr("lora")
        evals = ((None, "test"), (a.rank // 2, "test")) if method == "dylora" else ((None, "test"),)
        rows += run(method, lr, evals=evals)
        write_result(a.name, {"classify": {"rows": rows, "base_lr": base_lr, "partial": True}})
    if a.half_rank_lora:
        rows += [{**r, "method": f"lora r={a.rank // 2}"} for r in run("lora", base_lr, rank=a.rank // 2)]
    return {"lr_search_on_validation": [{k: r[k] for k in ("lr", "accuracy")} for r in search],
            "base_lr": base_lr, "rows": rows,
            "setup": {"train_articles": len(train_ds), "validation_articles": len(val_texts),
                      "test_articles": len(te_texts), "seq_len": a.cls_seq_len, "batch_size": a.cls_batch,
                      "epochs": 1, "steps": steps, "rank": a.rank, "alpha": 2 * a.rank, "seeds": [0]}}


# -- classification, learning-rate grid x seeds ---------------------------------------------------
def part_classify_grid(a: argparse.Namespace) -> dict[str, Any]:
    """The issue's protocol on the ``classify`` setup, for ``--methods`` (+ LoRA at r/2): every base LR of
    ``--cls-lrs`` (× the method's CLI multiplier) × every seed of ``--seeds``; each run scored on the validation
    slice and on test. Per method the LR with the best *validation* accuracy (mean over seeds) is chosen and its
    mean test accuracy reported (never chosen on test)."""
    import dataclasses

    tok = load_tokenizer("minilm-l6")
    texts, labels, names = load_labelled("bbc", "train")
    te_texts, te_labels, _ = load_labelled("bbc", "test")
    te_texts, te_labels = te_texts[: a.cls_eval], te_labels[: a.cls_eval]
    pool = LabelledTexts(texts, labels, seed=0)
    train_ds = LabelledTexts(pool.texts[: a.cls_train], pool.labels[: a.cls_train], seed=1)
    val = (pool.texts[a.cls_train: a.cls_train + a.cls_val], pool.labels[a.cls_train: a.cls_train + a.cls_val])
    base = load_model("minilm-l6", task="classify", num_labels=len(names))
    head0 = copy.deepcopy(base.classifier.state_dict())
    collate = TextCollator(tok, a.cls_seq_len)
    steps = -(-len(train_ds) // a.cls_batch)
    cfg0 = TrainConfig(task="classify", data="bbc", epochs=1, batch_size=a.cls_batch, seq_len=a.cls_seq_len)
    data = [collate([train_ds[i] for i in range(k * a.cls_batch, min(len(train_ds), (k + 1) * a.cls_batch))])
            for k in range(min(4, steps))]
    configs = [(m, a.rank) for m in a.methods] + ([("lora", a.rank // 2)] if a.half_rank_lora else [])
    runs: list[dict[str, Any]] = []
    out: dict[str, Any] = {"runs": runs, "setup": {
        "train_articles": len(train_ds), "validation_articles": len(val[0]), "test_articles": len(te_texts),
        "seq_len": a.cls_seq_len, "batch_size": a.cls_batch, "epochs": 1, "steps": steps, "rank": a.rank,
        "base_lrs": a.cls_lrs, "seeds": a.seeds, "lr_multiplier": "CLI's: x10 svfit, loldu, lora-xs"}}
    for method, rank in configs:
        label = method if rank == a.rank else f"{method} r={rank}"
        for base_lr in a.cls_lrs:
            lr = base_lr * default_lr(method) / default_lr("lora")
            for seed in a.seeds:
                model = copy.deepcopy(base)
                torch.manual_seed(seed)
                model.classifier.load_state_dict(head0)  # the same fresh head for every run
                init_s, model = attach(model, method, rank, 2.0 * rank, "classifier", steps, data, seed=seed)
                res = train(model, train_ds, dataclasses.replace(cfg0, seed=seed), collator=collate, lr=lr,
                            progress=a.progress)
                scores = {}
                for eval_rank in ((None, a.rank // 2) if method == "dylora" else (None,)):
                    if eval_rank is not None:
                        set_eval_rank(model, eval_rank)
                    key = label if eval_rank is None else f"{label} (eval r={eval_rank})"
                    scores[key] = {
                        "val": accuracy(model, tok, *val, seq_len=a.cls_seq_len, progress=False),
                        "test": accuracy(model, tok, te_texts, te_labels, seq_len=a.cls_seq_len, progress=False)}
                for key, sc in scores.items():
                    runs.append({"method": key, "rank": rank, "base_lr": base_lr, "lr": lr, "seed": seed, **sc,
                                 "init_s": init_s, "trainable_parameters": trainable_parameters(model),
                                 "losses": res.losses, **res.to_dict()})
                    print(f"  grid {key:24s} lr={lr:.0e} seed={seed} val={sc['val']:.3f} test={sc['test']:.3f} "
                          f"{res.s_per_step:.2f} s/step init {init_s:.2f}s", file=sys.stderr)
                del model
                gc.collect()
                out["rows"] = grid_rows(runs)
                write_result(a.name, {"classify_grid": out, "partial": True})  # a killed run keeps its rows
    out["rows"] = grid_rows(runs)
    return out


def grid_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the LR with the best mean validation accuracy over seeds, and its test accuracies."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        by_lr = {lr: [r for r in mine if r["lr"] == lr] for lr in dict.fromkeys(r["lr"] for r in mine)}
        lr = max(by_lr, key=lambda k: statistics.mean(r["val"] for r in by_lr[k]))
        chosen = by_lr[lr]
        tests = [r["test"] for r in chosen]
        rows.append({"method": method, "lr": lr, "seeds": [r["seed"] for r in chosen], "test_per_seed": tests,
                     "accuracy": statistics.mean(tests), "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                     "val_mean": statistics.mean(r["val"] for r in chosen),
                     "val_by_lr": {f"{k:g}": statistics.mean(r["val"] for r in v) for k, v in by_lr.items()},
                     "test_by_lr": {f"{k:g}": statistics.mean(r["test"] for r in v) for k, v in by_lr.items()},
                     "trainable_parameters": chosen[0]["trainable_parameters"],
                     "s_per_step": statistics.mean(r["s_per_step"] for r in chosen),
                     "init_s": statistics.mean(r["init_s"] for r in chosen)})
    return rows


# -- language modelling ---------------------------------------------------------------------------
def part_lm(a: argparse.Namespace) -> dict[str, Any]:
    tok = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m")
    cfg = TrainConfig(task="lm", data="ptb", steps=a.lm_steps, batch_size=a.lm_batch, seq_len=a.lm_seq_len,
                      eval_tokens=a.lm_eval_tokens, seed=0)
    dense = evaluate(base, tok, cfg, progress=False)["value"]
    print(f"  lm dense perplexity {dense:.2f}", file=sys.stderr)
    ds = LMWindows(tok, load_text("ptb", "train"), a.lm_seq_len, need_windows=a.lm_steps * a.lm_batch)
    data = init_batches(tok, cfg, 2)
    rows = []

    def run(method: str, rank: int, eval_ranks=(None,)) -> None:
        model = copy.deepcopy(base)
        init_s, model = attach(model, method, rank, 2.0 * rank, None, a.lm_steps, data, targets=a.lm_targets)
        lr = default_lr(method)
        res = train(model, ds, cfg, collator=lm_collate, lr=lr, progress=a.progress)
        for er in eval_ranks:
            if er is not None:
                set_eval_rank(model, er)
            ppl = evaluate(model, tok, cfg, progress=False)["value"]
            label = method if er is None else f"{method} (eval r={er})"
            if rank != a.rank:
                label = f"{method} r={rank}"
            rows.append({"method": label, "rank": rank, "lr": lr, "perplexity": ppl, "init_s": init_s,
                         "trainable_parameters": trainable_parameters(model), "losses": res.losses,
                         **res.to_dict()})
            print(f"  lm {label:24s} ppl={ppl:.2f} {res.s_per_step:.2f} s/step init {init_s:.2f}s",
                  file=sys.stderr)

    def result() -> dict[str, Any]:
        return {"dense_perplexity": dense, "rows": rows,
                "setup": {"steps": a.lm_steps, "batch_size": a.lm_batch, "seq_len": a.lm_seq_len,
                          "eval_tokens": a.lm_eval_tokens, "rank": a.rank, "alpha": 2 * a.rank,
                          "targets": a.lm_targets,
                          "lr": "CLI default per method (2e-4; x10 svfit, loldu, lora-xs)", "seeds": [0]}}

    for method in a.methods:
        run(method, a.rank, (None, a.rank // 2) if method == "dylora" else (None,))
        write_result(a.name, {"lm": result(), "partial": True})  # a killed run keeps its rows
        gc.collect()
    if a.half_rank_lora:
        run("lora", a.rank // 2)
    return {"dense_perplexity": dense, "rows": rows,
            "setup": {"steps": a.lm_steps, "batch_size": a.lm_batch, "seq_len": a.lm_seq_len,
                      "eval_tokens": a.lm_eval_tokens, "rank": a.rank, "alpha": 2 * a.rank,
                      "targets": a.lm_targets,
                      "lr": "CLI default per method (2e-4; x10 svfit, loldu, lora-xs)", "seeds": [0]}}


# -- parity with PEFT used by hand ----------------------------------------------------------------
def part_parity(a: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import peft
    from transformers import Trainer, TrainingArguments

    tok = load_tokenizer("minilm-l6")
    texts, labels, names = load_labelled("bbc", "train")
    ds = LabelledTexts(texts, labels, seed=0, max_items=8 * a.parity_steps)
    collate = TextCollator(tok, a.cls_seq_len)
    base = load_model("minilm-l6", task="classify", num_labels=len(names))
    out = {}
    for method in ("dora", "olora"):
        ours = apply(copy.deepcopy(base), AdapterConfig(method=method, rank=a.rank, modules_to_save="^classifier$"),
                     progress=False)
        targets = list(ours.rankwise_adapter["targets"])
        res = train(ours, ds, TrainConfig(task="classify", steps=a.parity_steps, batch_size=8,
                                          seq_len=a.cls_seq_len), collator=collate, lr=1e-3, progress=False)
        kw = {"use_dora": True} if method == "dora" else {"init_lora_weights": "olora"}
        torch.manual_seed(0)
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=a.rank, lora_alpha=2 * a.rank, target_modules=targets, modules_to_save=["classifier"], **kw))
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, max_steps=a.parity_steps, per_device_train_batch_size=8,
                                     learning_rate=1e-3, lr_scheduler_type="linear", max_grad_norm=1.0, seed=0,
                                     data_seed=0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                     disable_tqdm=True, remove_unused_columns=False)
            tr = Trainer(model=theirs, args=args, train_dataset=ds, data_collator=collate)
            tr.train()
        ref = [e["loss"] for e in tr.state.log_history if "loss" in e]
        diff = max(abs(x - y) for x, y in zip(res.losses, ref))
        out[method] = {"rankwise": res.losses, "peft": ref, "max_abs_diff": diff}
        print(f"  parity {method}: max |loss diff| over {len(ref)} steps = {diff:.2e}", file=sys.stderr)
    return out


# -- init time ------------------------------------------------------------------------------------
def _pissa_parts(model) -> dict[str, torch.Tensor]:
    """The rank-r principal part each PiSSA init put into its adapter (scale · B A), by target name."""
    from rankwise.tune.base import AdapterLayer

    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "lora_B") and hasattr(mod.lora_A, "keys"):  # PEFT LoraLayer
            for key in mod.lora_A.keys():
                b_w, a_w = mod.lora_B[key].weight, mod.lora_A[key].weight
                out[name.removeprefix("base_model.model.")] = (mod.scaling[key] * (b_w @ a_w)).detach().float()
        elif isinstance(mod, AdapterLayer):  # rankwise
            out[name] = mod.delta_weight().detach().float()
    return out


def part_init(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    methods = a.init_methods.split(",")
    for name in a.init_models.split(","):
        cls = name == "minilm-l6"
        base = load_model(name, task="classify" if cls else "causal-lm", **({"num_labels": 5} if cls else {}))
        head = "classifier" if cls else None
        times: dict[str, list[float]] = {}
        errors: dict[str, dict[str, torch.Tensor]] = {}
        exact = None
        for _ in range(a.init_rounds):
            for method in methods:
                t, m = attach(copy.deepcopy(base), method, a.rank, 2.0 * a.rank, head, 1, None)
                times.setdefault(method, []).append(t)
                if a.init_error:
                    errors[method] = _pissa_parts(m)  # compared below, once an exact reference exists
                    if method == "pissa" or (method == "peft-pissa" and exact is None):
                        exact = errors[method]
                del m
                gc.collect()
        if a.init_error and exact is None:  # no exact method in the list: the reference from a thin SVD
            from rankwise.surgery import find_targets

            exact = {}
            for t in find_targets(base):
                if head and t.name.startswith(head):
                    continue
                u, sv, vh = torch.linalg.svd(t.weight().float(), full_matrices=False)
                exact[t.name] = (u[:, : a.rank] * sv[: a.rank]) @ vh[: a.rank]
        err = {k: float(statistics.mean(
            float(torch.linalg.matrix_norm(v[n] - exact[n]) / torch.linalg.matrix_norm(exact[n]))
            for n in v if n in exact)) for k, v in errors.items() if v} if a.init_error else {}
        med = {k: statistics.median(v) for k, v in times.items()}
        res: dict[str, Any] = {"seconds": times, "median_s": med, "rank": a.rank,
                               "relative_error_vs_exact_top_r": err}
        for peft_key in ("peft-pissa", "peft-pissa-rand", "peft-pissa-rand4"):
            if peft_key in med and "pissa@rand" in med:
                res[f"{peft_key}_over_rankwise_rand"] = med[peft_key] / med["pissa@rand"]
        out[name] = res
        print(f"  init {name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in med.items())
              + ("; rel. error " + ", ".join(f"{k} {v:.1e}" for k, v in err.items()) if err else ""),
              file=sys.stderr)
        del base
        gc.collect()
    return out


# -- healing --------------------------------------------------------------------------------------
def part_heal(a: argparse.Namespace) -> dict[str, Any]:
    import rankwise

    tok = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m")
    cfg = TrainConfig(task="lm", data="ptb", steps=a.lm_steps, batch_size=a.lm_batch, seq_len=a.lm_seq_len,
                      eval_tokens=a.lm_eval_tokens)
    dense = evaluate(base, tok, cfg, progress=False)["value"]
    ds = LMWindows(tok, load_text("ptb", "train"), a.lm_seq_len, need_windows=a.lm_steps * a.lm_batch)
    rows = []
    for ratio in (0.2,):
        model = copy.deepcopy(base)
        rankwise.compress(model, rankwise.CompressConfig(ratio=ratio, method="whiten", alloc="uniform",
                                                         calib_samples=8, seq_len=128, progress=False),
                          tokenizer=tok)
        ppl_c = evaluate(model, tok, cfg, progress=False)["value"]
        apply(model, AdapterConfig(method="heal"), progress=False)
        res = train(model, ds, cfg, collator=lm_collate, lr=1e-4, progress=a.progress)
        ppl_h = evaluate(model, tok, cfg, progress=False)["value"]
        rows.append({"ratio": ratio, "dense": dense, "compressed": ppl_c, "healed": ppl_h,
                     "recovered_fraction": (ppl_c - ppl_h) / (ppl_c - dense) if ppl_c > dense else None,
                     "trainable_parameters": trainable_parameters(model), **res.to_dict()})
    return {"rows": rows}


# -- goals and picture ----------------------------------------------------------------------------
def goals(out: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    g: list[dict[str, Any]] = []
    if "parity" in out:
        worst = max(v["max_abs_diff"] for v in out["parity"].values())
        g.append({"goal": "PEFT-backed methods give PEFT's own loss curve within 1e-5 (dora, olora)",
                  "measured": f"max |diff| {worst:.1e}", "met": worst <= 1e-5})
    if "classify" in out:
        rows = {r["method"]: r for r in out["classify"]["rows"]}
        lora, xs = rows.get("lora"), rows.get("lora-xs")
        if lora and xs:
            gap = 100 * (lora["accuracy"] - xs["accuracy"])
            ratio = lora["trainable_parameters"] / xs["trainable_parameters"]
            g.append({"goal": "LoRA-XS within 1 point of LoRA with >= 20x fewer trainable parameters (BBC)",
                      "measured": f"accuracy {xs['accuracy']:.3f} vs LoRA {lora['accuracy']:.3f}, {ratio:.0f}x fewer "
                                  "trainable parameters (adapter + head)",
                      "met": gap <= 1.0 and ratio >= 20})
        dy, half = rows.get(f"dylora (eval r={rank // 2})"), rows.get(f"lora r={rank // 2}")
        if dy and half:
            gap = 100 * (half["accuracy"] - dy["accuracy"])
            g.append({"goal": f"DyLoRA at r/2={rank // 2} within 1 point of a LoRA trained at r/2 (BBC)",
                      "measured": f"accuracy {dy['accuracy']:.3f} vs {half['accuracy']:.3f}", "met": gap <= 1.0})
    if out.get("classify_grid", {}).get("rows"):
        rows = {r["method"]: r for r in out["classify_grid"]["rows"]}
        n = len(out["classify_grid"]["setup"]["base_lrs"]), len(out["classify_grid"]["setup"]["seeds"])
        lora, xs = rows.get("lora"), rows.get("lora-xs")
        if lora and xs:
            gap = 100 * (lora["accuracy"] - xs["accuracy"])
            ratio = lora["trainable_parameters"] / xs["trainable_parameters"]
            g.append({"goal": f"LoRA-XS within 1 point of LoRA with >= 20x fewer trainable parameters "
                              f"(BBC, {n[0]} LRs x {n[1]} seeds, LR chosen on validation)",
                      "measured": f"test accuracy {xs['accuracy']:.3f} vs LoRA {lora['accuracy']:.3f} (mean of "
                                  f"{n[1]} seeds), {ratio:.0f}x fewer trainable parameters",
                      "met": gap <= 1.0 and ratio >= 20})
        dy, half = rows.get(f"dylora (eval r={rank // 2})"), rows.get(f"lora r={rank // 2}")
        if dy and half:
            gap = 100 * (half["accuracy"] - dy["accuracy"])
            g.append({"goal": f"DyLoRA at r/2={rank // 2} within 1 point of a LoRA trained at r/2 "
                              f"(BBC, {n[0]} LRs x {n[1]} seeds, LR chosen on validation)",
                      "measured": f"test accuracy {dy['accuracy']:.3f} vs {half['accuracy']:.3f}", "met": gap <= 1.0})
    if "lm" in out:
        rows = {r["method"]: r for r in out["lm"]["rows"]}
        dy, half = rows.get(f"dylora (eval r={rank // 2})"), rows.get(f"lora r={rank // 2}")
        if dy and half:
            gap = dy["perplexity"] - half["perplexity"]
            g.append({"goal": f"DyLoRA at r/2={rank // 2} within 1 point of a LoRA trained at r/2 (PTB perplexity)",
                      "measured": f"perplexity {dy['perplexity']:.2f} vs {half['perplexity']:.2f}",
                      "met": gap <= 1.0})
        if "lora-ga" in rows:
            def smooth(xs: list[float]) -> list[float]:
                return [statistics.mean(xs[max(0, i - 2): i + 1]) for i in range(len(xs))]

            target = smooth(rows["lora"]["losses"])[-1]
            ga = smooth(rows["lora-ga"]["losses"])
            hit = next((i + 1 for i, v in enumerate(ga) if v <= target), None)
            n = len(ga)
            g.append({"goal": "LoRA-GA reaches LoRA's final loss in <= half the steps (PTB, 3-step mean)",
                      "measured": f"step {hit} of {n}" if hit else f"not within {n} steps",
                      "met": hit is not None and hit <= n / 2})
    return g


def picture(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [(k, m) for k, m in (("classify", "accuracy"), ("classify_grid", "accuracy"), ("lm", "perplexity"))
             if out.get(k, {}).get("rows")]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.8), squeeze=False)
    for ax, (key, metric) in zip(axes[0], parts):
        for r in out[key]["rows"]:
            peft_backed = r["method"].split(" ")[0] in ("dora", "adalora", "eva", "olora", "corda", "loftq")
            ax.errorbar(r["trainable_parameters"], r[metric], yerr=r.get("test_sd") or None,
                        fmt="s" if peft_backed else "o", color="tab:orange" if peft_backed else "tab:blue",
                        capsize=3)
            ax.annotate(r["method"], (r["trainable_parameters"], r[metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        if key == "classify":
            ax.set_ylabel("BBC test accuracy")
            ax.set_title(f"MiniLM-L6, BBC, 1 epoch of {out[key]['setup']['train_articles']} articles")
        elif key == "classify_grid":
            st = out[key]["setup"]
            ax.set_ylabel("BBC test accuracy (mean ± sd over seeds)")
            ax.set_title(f"MiniLM-L6, BBC, {st['train_articles']} articles: {len(st['base_lrs'])} LRs × "
                         f"{len(st['seeds'])} seeds, LR chosen on validation", fontsize=10)
        else:
            ax.set_ylabel("PTB test perplexity (lower is better)")
            ax.axhline(out[key]["dense_perplexity"], color="gray", ls=":", lw=1, label="no adapter")
            ax.legend(loc="upper right", fontsize=8)
            ax.set_title(f"SmolLM2-135M, PTB, {out[key]['setup']['steps']} steps")
        ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, "circles: native rankwise adapters; squares: through PEFT", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="parity,classify,lm,init")
    p.add_argument("--methods", default=",".join(ALL))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--cls-lrs", default="1e-3,3e-3")
    p.add_argument("--cls-base-lr", type=float, default=None, help="skip the validation search, use this LR")
    p.add_argument("--seeds", default="0,1", help="classify-grid: seeds of every (method, LR)")
    p.add_argument("--cls-train", type=int, default=64)
    p.add_argument("--cls-val", type=int, default=48)
    p.add_argument("--cls-eval", type=int, default=100)
    p.add_argument("--cls-seq-len", type=int, default=128)
    p.add_argument("--cls-batch", type=int, default=8)
    p.add_argument("--lm-steps", type=int, default=4)
    p.add_argument("--lm-targets", default="q_proj|v_proj", help="regex of SmolLM2 layers adapted in the LM part "
                   "(default q_proj|v_proj, LoRA's original choice: keeps the 30-layer SVD inits affordable)")
    p.add_argument("--lm-batch", type=int, default=1)
    p.add_argument("--lm-seq-len", type=int, default=128)
    p.add_argument("--lm-eval-tokens", type=int, default=512)
    p.add_argument("--parity-steps", type=int, default=6)
    p.add_argument("--no-half-rank-lora", dest="half_rank_lora", action="store_false",
                   help="skip the LoRA-at-r/2 reference row (when methods are split over processes)")
    p.add_argument("--init-rounds", type=int, default=1)
    p.add_argument("--init-models", default="minilm-l6,smollm2-135m")
    p.add_argument("--init-methods", default="peft-pissa,pissa,pissa@rand,peft-pissa-rand,peft-pissa-rand4",
                   help="interleaved in this order each round (pissa@rand: rankwise randomized)")
    p.add_argument("--no-init-error", dest="init_error", action="store_false",
                   help="skip the error of each init against the exact top-r SVD")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--name", default="tune_quality", help="result name under bench/results/")
    p.add_argument("--inputs", default="tune_quality_cls,tune_quality_lm",
                   help="--parts report: result names to merge")
    p.add_argument("--picture", default=str(PICTURE))
    p.add_argument("--prefer-later", action="store_true",
                   help="--parts report: a method's rows from a later input replace an earlier input's")
    a = p.parse_args(argv)
    a.methods = [] if a.methods == "none" else a.methods.split(",")  # none: only the LoRA-at-r/2 reference
    a.cls_lrs = [float(x) for x in a.cls_lrs.split(",")]
    a.seeds = [int(x) for x in a.seeds.split(",")]
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    import peft

    out: dict[str, Any] = {"peft_version": peft.__version__, "settings": {k: v for k, v in vars(a).items()}}
    if a.parts == "report":  # merge parts measured by separate processes, then goals and picture
        import json

        from _common import RESULTS

        for name in a.inputs.split(","):
            data = json.loads((RESULTS / f"{name}.json").read_text())
            runs = out.setdefault("runs", {})
            runs.update(data.get("runs") or {})  # a merged input keeps the runs it was merged from
            runs[name] = data.get("run")
            for k in ("parity", "classify", "classify_grid", "lm", "init", "heal"):
                if k not in data:
                    continue
                if k == "init" and "init" in out:  # another interleaved run: kept beside, per model
                    for model, r in data["init"].items():
                        if model in out["init"]:
                            out["init"][model].setdefault("more_runs", []).append({"input": name, **r})
                        else:
                            out["init"][model] = r
                    continue
                if k in out and "rows" in out[k]:  # methods split over processes: concatenate their rows
                    new = {r["method"] for r in data[k]["rows"]}
                    if a.prefer_later:  # a later run of a method replaces the earlier one
                        out[k]["rows"] = [r for r in out[k]["rows"] if r["method"] not in new]
                    seen = {r["method"] for r in out[k]["rows"]}
                    out[k]["rows"] += [r for r in data[k]["rows"] if r["method"] not in seen]
                else:
                    out[k] = data[k]
        out["goals"] = goals(out, a.rank)
        write_result(a.name, out)
    for part in (p for p in a.parts.split(",") if p != "report"):
        key = part.replace("-", "_")
        out[key] = {"parity": part_parity, "classify": part_classify, "classify_grid": part_classify_grid,
                    "lm": part_lm, "init": part_init, "heal": part_heal}[key](a)
        out["goals"] = goals(out, a.rank)
        out["wall_s"] = time.perf_counter() - t0
        write_result(a.name, out)  # after every part: a crash keeps what was measured
    if "goals" not in out:
        out["goals"] = []
    if "classify" in out:
        print(f"\n## BBC classification, MiniLM-L6 (base lr {out['classify']['base_lr']:g} chosen on validation)\n"
              + table(out["classify"]["rows"], "accuracy"))
    if out.get("classify_grid", {}).get("rows"):
        st = out["classify_grid"]["setup"]
        print(f"\n## BBC classification, {len(st['base_lrs'])} base LRs {st['base_lrs']} x seeds {st['seeds']} "
              "(LR chosen per method on validation; test mean ± sd over seeds)\n"
              "| method | trainable params | chosen lr | test accuracy | per seed | val by lr | s/step | init s |\n"
              "|---|---:|---:|---:|---|---|---:|---:|")
        for r in out["classify_grid"]["rows"]:
            vb = ", ".join(f"{k}: {v:.3f}" for k, v in r["val_by_lr"].items())
            print(f"| {r['method']} | {r['trainable_parameters']:,} | {r['lr']:g} | {r['accuracy']:.3f} ± "
                  f"{r['test_sd']:.3f} | {', '.join(f'{x:.3f}' for x in r['test_per_seed'])} | {vb} | "
                  f"{r['s_per_step']:.2f} | {r['init_s']:.1f} |")
    if "lm" in out:
        print(f"\n## PTB LM, SmolLM2-135M (dense perplexity {out['lm']['dense_perplexity']:.2f})\n"
              + table(out["lm"]["rows"], "perplexity"))
    if "init" in out:
        print("\n## PiSSA init time (median of interleaved rounds; error: rel. Frobenius vs exact top-r)\n"
              "| model | init | seconds | / rankwise randomized | rel. error |\n|---|---|---:|---:|---:|")
        for name, r in out["init"].items():
            md, err = r["median_s"], r.get("relative_error_vs_exact_top_r", {})
            for k, v in md.items():
                ratio = f"{v / md['pissa@rand']:.2f}x" if "pissa@rand" in md else "n/a"
                e = f"{err[k]:.1e}" if k in err else "n/a"
                print(f"| {name} | {k} | {v:.2f} | {ratio} | {e} |")
    print("\n## Goals\n| goal | measured | met |\n|---|---|---|")
    for g in out["goals"]:
        print(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |")
    picture(out, Path(a.picture))
    print(f"\ntotal {(time.perf_counter() - t0) / 60:.1f} min; picture {a.picture}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

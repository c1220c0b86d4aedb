"""Benchmark of rankwise.tune adapters against PEFT, side by side in one process.

Four parts (issue 5), each scaled by default so the whole script finishes in
< 25 min on 2 shared CPU cores; ``--full`` restores the issue's protocol.

1. BBC classification on MiniLM-L6 (fresh 5-way head trained with the adapter):
   default 160 training articles, seq-len 128, batch 8, 1 epoch, LR grid
   {1e-3} (svfit and loldu ×10: they train singular values / a diagonal), seed 0,
   accuracy on 200 test articles.  --full: 600 articles, seq-len 256, batch 4,
   LRs {2e-4, 5e-4, 1e-3}, seeds {0, 1}, all 445 test articles.
2. Causal LM on SmolLM2-135M: default 10 steps of 2×128 PTB-train tokens,
   PTB-test perplexity on 1,024 tokens.  --full: 100 steps of 4×256, 4,096 tokens.
3. Healing: SmolLM2 compressed by ``rankwise.compress`` (whiten, uniform
   allocation) at ρ = 0.2 and 0.4, then ``heal`` (train the factors) for the LM
   budget of part 2; reports the fraction of the perplexity gap to dense recovered.
4. Init time: PiSSA exact/randomized, PEFT and rankwise, interleaved rounds.

Step time is also measured A/B (rankwise lora and PEFT LoRA steps interleaved on
the same batch) because the shared machine's load drifts during a run.

    python bench/tune_quality.py            # scaled default (1 torch thread)
    python bench/tune_quality.py --full     # the issue's protocol (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rankwise.io.models import load_model, load_tokenizer
from rankwise.io.texts import load_labelled
from rankwise.tune import AdapterConfig, apply, trainable_parameters
from rankwise.tune.trainer import ClassifyData, LMData, TrainConfig, accuracy, evaluate, train

RESULTS = Path(__file__).parent / "results" / "tune_quality.json"
LR_MULT = {"svfit": 10.0, "loldu": 10.0}


# -- adapters: rankwise and PEFT behind one interface ---------------------------------------------
def attach(model, method: str, rank: int, alpha: float, targets: list[str], head: str | None) -> tuple[float, Any]:
    """Attach ``method`` to ``model``; returns (init seconds, the model to train: PEFT wraps it)."""
    t0 = time.perf_counter()
    if method.startswith("peft-"):
        import peft

        init = {"peft-lora": True, "peft-pissa": "pissa", "peft-pissa-rand": "pissa_niter_2"}[method]
        cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                              init_lora_weights=init, modules_to_save=[head] if head else None)
        model = peft.get_peft_model(model, cfg)
    else:
        name, _, variant = method.partition("-")
        cfg = AdapterConfig(method=name, rank=None if name == "svfit" else rank, alpha=alpha,
                            targets="^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$",
                            modules_to_save=f"^{head}$" if head else None,
                            svd="randomized" if variant == "rand" else "exact", svd_iters=2)
        apply(model, cfg, progress=False)
    return time.perf_counter() - t0, model


def body_targets(model, head: str | None) -> list[str]:
    from rankwise.surgery import find_targets

    return [t.name for t in find_targets(model) if not (head and t.name.startswith(head))]


def row_table(rows: list[dict[str, Any]], metric: str) -> str:
    hdr = f"| method | trainable params | {metric} | s/step | peak RSS +MB | init s |"
    lines = [hdr, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        val = f"{r[metric]:.4f}" if metric == "accuracy" else f"{r[metric]:.2f}"
        lines.append(f"| {r['method']} | {r['trainable_parameters']:,} | {val} | {r['s_per_step']:.2f} | "
                     f"{r['peak_rss_delta_mb']:.0f} | {r['init_s']:.2f} |")
    return "\n".join(lines)


# -- part 1: classification -----------------------------------------------------------------------
def part_classify(a: argparse.Namespace) -> dict[str, Any]:
    tok = load_tokenizer("minilm-l6")
    texts, labels, names = load_labelled("bbc", "train")
    te_texts, te_labels, _ = load_labelled("bbc", "test")
    te_texts, te_labels = te_texts[: a.cls_eval], te_labels[: a.cls_eval]
    base = load_model("minilm-l6", task="classify", num_labels=len(names))
    targets = body_targets(base, "classifier")
    head_init = copy.deepcopy(base.classifier.state_dict())
    runs, best = [], []
    for method in a.cls_methods:
        per_lr: dict[float, list[dict[str, Any]]] = {}
        for lr0 in a.cls_lrs:
            lr = lr0 * LR_MULT.get(method.split("-")[0] if not method.startswith("peft") else "", 1.0)
            for seed in a.seeds:
                torch.manual_seed(seed)
                model = copy.deepcopy(base)
                model.classifier.load_state_dict(head_init)  # same fresh head for every run
                init_s, model = attach(model, method, a.rank, a.alpha, targets, "classifier")
                cfg = TrainConfig(task="classify", data="bbc", epochs=1, lr=lr, batch_size=a.cls_batch,
                                  seq_len=a.cls_seq_len, seed=seed, max_train=a.cls_train)
                data = ClassifyData(tok, texts, labels, cfg)
                res = train(model, data, cfg, progress=a.progress)
                acc = accuracy(model, tok, te_texts, te_labels, seq_len=a.cls_seq_len, progress=False)
                rec = {"method": method, "lr": lr, "seed": seed, "accuracy": acc, "init_s": init_s,
                       "trainable_parameters": trainable_parameters(model), **res.to_dict()}
                runs.append(rec)
                per_lr.setdefault(lr, []).append(rec)
                print(f"  cls {method:16s} lr={lr:.0e} seed={seed} acc={acc:.4f} {res.s_per_step:.2f} s/step "
                      f"init {init_s:.2f}s", file=sys.stderr)
                del model
                gc.collect()
        lr_best = max(per_lr, key=lambda k: statistics.mean(r["accuracy"] for r in per_lr[k]))
        rs = per_lr[lr_best]
        best.append({
            "method": method, "lr": lr_best, "accuracy": statistics.mean(r["accuracy"] for r in rs),
            "accuracy_seeds": [r["accuracy"] for r in rs],
            "trainable_parameters": rs[0]["trainable_parameters"],
            "s_per_step": statistics.mean(r["s_per_step"] for r in rs),
            "peak_rss_delta_mb": max(r["peak_rss_delta_mb"] for r in rs),
            "init_s": statistics.mean(r["init_s"] for r in rs),
        })
    ab = step_ab(base, tok, texts, labels, targets, a)
    return {"runs": runs, "best": best, "step_time_ab": ab,
            "setup": {"train_articles": a.cls_train, "eval_articles": len(te_texts), "seq_len": a.cls_seq_len,
                      "batch_size": a.cls_batch, "epochs": 1, "lrs": a.cls_lrs, "seeds": a.seeds,
                      "rank": a.rank, "alpha": a.alpha, "lr_multiplier": LR_MULT}}


def step_ab(base, tok, texts, labels, targets, a) -> dict[str, Any]:
    """Interleave rankwise-lora and PEFT-LoRA training steps on identical batches; median step times."""
    cfg = TrainConfig(task="classify", data="bbc", steps=1, lr=1e-3, batch_size=a.cls_batch, seq_len=a.cls_seq_len)
    batch = ClassifyData(tok, texts, labels, cfg).batch()
    models = {}
    for method in ("lora", "peft-lora"):
        _, m = attach(copy.deepcopy(base), method, a.rank, a.alpha, targets, "classifier")
        m.train()
        models[method] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3))
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(a.ab_rounds + 1):
        for name in (list(models) if i % 2 == 0 else list(reversed(models))):
            m, opt = models[name]
            t0 = time.perf_counter()
            m(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"rounds": a.ab_rounds, "median_s": med, "ratio_rankwise_over_peft": med["lora"] / med["peft-lora"]}


# -- part 2: language modelling -------------------------------------------------------------------
def lm_cfg(a: argparse.Namespace, seed: int = 0, lr: float | None = None) -> TrainConfig:
    return TrainConfig(task="lm", data="ptb", steps=a.lm_steps, lr=lr or a.lm_lr, batch_size=a.lm_batch,
                       seq_len=a.lm_seq_len, seed=seed, eval_tokens=a.lm_eval_tokens)


def part_lm(a: argparse.Namespace) -> dict[str, Any]:
    tok = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m")
    targets = body_targets(base, None)
    cfg0 = lm_cfg(a)
    dense = evaluate(base, tok, cfg0, progress=False)["value"]
    print(f"  lm dense perplexity {dense:.2f}", file=sys.stderr)
    rows = []
    for method in a.lm_methods:
        model = copy.deepcopy(base)
        init_s, model = attach(model, method, a.rank, a.alpha, targets, None)
        cfg = lm_cfg(a, lr=a.lm_lr * LR_MULT.get(method, 1.0))
        data = LMData(tok, _ptb_train(), cfg, need_tokens=cfg.steps * cfg.batch_size * cfg.seq_len)
        res = train(model, data, cfg, progress=a.progress)
        ppl = evaluate(model, tok, cfg, progress=False)["value"]
        rows.append({"method": method, "perplexity": ppl, "init_s": init_s,
                     "trainable_parameters": trainable_parameters(model), **res.to_dict()})
        print(f"  lm {method:16s} ppl={ppl:.2f} {res.s_per_step:.2f} s/step init {init_s:.2f}s", file=sys.stderr)
        del model
        gc.collect()
    return {"dense_perplexity": dense, "rows": rows,
            "setup": {"steps": a.lm_steps, "batch_size": a.lm_batch, "seq_len": a.lm_seq_len, "lr": a.lm_lr,
                      "eval_tokens": a.lm_eval_tokens, "rank": a.rank, "alpha": a.alpha}}


def _ptb_train() -> str:
    from rankwise.io.texts import load_text

    return load_text("ptb", "train")


# -- part 3: healing ------------------------------------------------------------------------------
def part_heal(a: argparse.Namespace) -> dict[str, Any]:
    import rankwise

    tok = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m")
    cfg = lm_cfg(a, lr=a.heal_lr)
    dense = evaluate(base, tok, cfg, progress=False)["value"]
    rows = []
    for ratio in a.heal_ratios:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        res_c = rankwise.compress(model, rankwise.CompressConfig(
            ratio=ratio, method=a.heal_compress, alloc="uniform", sequential=False,
            calib_samples=a.heal_calib, seq_len=128, progress=False), tokenizer=tok)
        comp_s = time.perf_counter() - t0
        ppl_c = evaluate(model, tok, cfg, progress=False)["value"]
        apply(model, AdapterConfig(method="heal"), progress=False)
        data = LMData(tok, _ptb_train(), cfg, need_tokens=cfg.steps * cfg.batch_size * cfg.seq_len)
        tr = train(model, data, cfg, progress=a.progress)
        ppl_h = evaluate(model, tok, cfg, progress=False)["value"]
        rec = (ppl_c - ppl_h) / (ppl_c - dense) if ppl_c > dense else float("nan")
        achieved = getattr(res_c, "achieved_ratio", None)
        rows.append({"ratio": ratio, "achieved_ratio": achieved, "compress_s": comp_s, "dense": dense,
                     "compressed": ppl_c, "healed": ppl_h, "recovered_fraction": rec,
                     "trainable_parameters": trainable_parameters(model), **tr.to_dict()})
        print(f"  heal rho={ratio} dense {dense:.2f} compressed {ppl_c:.2f} healed {ppl_h:.2f} "
              f"recovered {rec:.1%}", file=sys.stderr)
        del model
        gc.collect()
    return {"rows": rows, "setup": {"compress": {"method": a.heal_compress, "alloc": "uniform",
                                                 "calib_samples": a.heal_calib, "seq_len": 128},
                                    "heal": "factors", "steps": a.lm_steps, "lr": a.heal_lr,
                                    "batch_size": a.lm_batch, "seq_len": a.lm_seq_len,
                                    "eval_tokens": a.lm_eval_tokens}}


# -- part 4: init time A/B -----------------------------------------------------------------------
def part_init(a: argparse.Namespace) -> dict[str, Any]:
    """PiSSA init time, PEFT (exact / randomized) vs rankwise (exact / randomized), interleaved per round."""
    out: dict[str, Any] = {}
    for name in ("minilm-l6", "smollm2-135m"):
        cls = name == "minilm-l6"
        base = load_model(name, task="classify" if cls else "causal-lm", **({"num_labels": 5} if cls else {}))
        head = "classifier" if cls else None
        targets = body_targets(base, head)
        times: dict[str, list[float]] = {}
        for _ in range(a.init_rounds):
            for method in ("peft-pissa", "pissa", "pissa-rand", "peft-pissa-rand"):
                t, m = attach(copy.deepcopy(base), method, a.rank, a.alpha, targets, head)
                times.setdefault(method, []).append(t)
                del m
                gc.collect()
        med = {k: statistics.median(v) for k, v in times.items()}
        out[name] = {"seconds": times, "median_s": med,
                     "speedup_rankwise_rand_vs_peft_exact": med["peft-pissa"] / med["pissa-rand"]}
        print(f"  init {name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in med.items()), file=sys.stderr)
        del base
        gc.collect()
    return out


# -- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="the issue's full protocol (slow)")
    p.add_argument("--parts", default="classify,lm,heal,init")
    p.add_argument("--init-rounds", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--seeds", default=None)
    p.add_argument("--cls-methods", default="peft-lora,lora,peft-pissa,pissa,pissa-rand,svfit")
    p.add_argument("--cls-lrs", default=None)
    p.add_argument("--cls-train", type=int, default=None)
    p.add_argument("--cls-eval", type=int, default=None)
    p.add_argument("--cls-seq-len", type=int, default=None)
    p.add_argument("--cls-batch", type=int, default=None)
    p.add_argument("--ab-rounds", type=int, default=6)
    p.add_argument("--lm-methods", default="peft-lora,lora,peft-pissa,pissa-rand")
    p.add_argument("--lm-steps", type=int, default=None)
    p.add_argument("--lm-batch", type=int, default=None)
    p.add_argument("--lm-seq-len", type=int, default=None)
    p.add_argument("--lm-lr", type=float, default=2e-4)
    p.add_argument("--lm-eval-tokens", type=int, default=None)
    p.add_argument("--heal-ratios", default="0.2,0.4")
    p.add_argument("--heal-compress", default="whiten")
    p.add_argument("--heal-calib", type=int, default=8)
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on the shared 2-core box 1 thread ran 2.5-3x faster than 2)")
    p.add_argument("--progress", action="store_true", help="show per-run progress bars")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    full = a.full
    a.seeds = [int(s) for s in (a.seeds or ("0,1" if full else "0")).split(",")]
    a.cls_lrs = [float(x) for x in (a.cls_lrs or ("2e-4,5e-4,1e-3" if full else "1e-3")).split(",")]
    a.cls_train = a.cls_train or (600 if full else 160)
    a.cls_eval = a.cls_eval or (100_000 if full else 200)
    a.cls_seq_len = a.cls_seq_len or (256 if full else 128)
    a.cls_batch = a.cls_batch or (4 if full else 8)
    a.lm_steps = a.lm_steps or (100 if full else 10)
    a.lm_batch = a.lm_batch or (4 if full else 2)
    a.lm_seq_len = a.lm_seq_len or (256 if full else 128)
    a.lm_eval_tokens = a.lm_eval_tokens or (4096 if full else 1024)
    a.cls_methods = a.cls_methods.split(",")
    a.lm_methods = a.lm_methods.split(",")
    a.heal_ratios = [float(x) for x in a.heal_ratios.split(",")]
    a.parts = a.parts.split(",")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"command": "python bench/tune_quality.py " + " ".join(argv or sys.argv[1:]),
                           "full_protocol": a.full, "torch_threads": torch.get_num_threads(),
                           "settings": {k: v for k, v in vars(a).items() if k != "out"},
                           "device": "cpu"}
    try:
        import peft

        out["peft_version"] = peft.__version__
    except ImportError:
        print("peft is not installed (pip install -e '.[bench]'); PEFT rows are skipped", file=sys.stderr)
        a.cls_methods = [m for m in a.cls_methods if not m.startswith("peft")]
        a.lm_methods = [m for m in a.lm_methods if not m.startswith("peft")]
    if "classify" in a.parts:
        out["classify"] = part_classify(a)
        print("\n## BBC classification, MiniLM-L6\n" + row_table(out["classify"]["best"], "accuracy"))
        ab = out["classify"]["step_time_ab"]
        print(f"A/B step time rankwise lora / PEFT LoRA = {ab['ratio_rankwise_over_peft']:.3f} "
              f"(medians {ab['median_s']['lora']:.3f} s vs {ab['median_s']['peft-lora']:.3f} s)")
    if "lm" in a.parts:
        out["lm"] = part_lm(a)
        print(f"\n## PTB LM, SmolLM2-135M (dense perplexity {out['lm']['dense_perplexity']:.2f})\n"
              + row_table(out["lm"]["rows"], "perplexity"))
    if "heal" in a.parts:
        out["heal"] = part_heal(a)
        print("\n## Healing compressed SmolLM2 (heal: train the factors)\n"
              "| ρ | dense ppl | compressed ppl | healed ppl | gap recovered | trainable | s/step |\n"
              "|---:|---:|---:|---:|---:|---:|---:|")
        for r in out["heal"]["rows"]:
            print(f"| {r['ratio']} | {r['dense']:.2f} | {r['compressed']:.2f} | {r['healed']:.2f} | "
                  f"{r['recovered_fraction']:.1%} | {r['trainable_parameters']:,} | {r['s_per_step']:.2f} |")
    if "init" in a.parts:
        out["init"] = part_init(a)
        print("\n## PiSSA init time (median of interleaved rounds)\n| model | PEFT exact | rankwise exact | "
              "rankwise randomized | PEFT randomized | speed-up (PEFT exact / rankwise randomized) |\n"
              "|---|---:|---:|---:|---:|---:|")
        for name, r in out["init"].items():
            md = r["median_s"]
            print(f"| {name} | {md['peft-pissa']:.2f} | {md['pissa']:.2f} | {md['pissa-rand']:.2f} | "
                  f"{md['peft-pissa-rand']:.2f} | {r['speedup_rankwise_rand_vs_peft_exact']:.1f}× |")
    out["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal {out['wall_s'] / 60:.1f} min", file=sys.stderr)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    from rankwise.io.atomic import atomic_file

    with atomic_file(path) as fh:
        json.dump(out, fh, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MoDeGPT (``--method modegpt``) against the default pipeline on SmolLM2-135M, side by side in one process.

Every row is compressed from the same dense model with CompressConfig's defaults (calibration
text, windows, seed) and only the named fields changed. Perplexity: first 4,096 tokens, 512-token
windows, BOS prepended, on PTB valid and BBC valid (``load_text('bbc', 'valid')``, a slice of BBC
train; MoDeGPT's sequential/non-sequential choice is made on these), and on PTB test and BBC test
(the README rows; nothing is chosen on them).

    python bench/modegpt.py --threads 1                    # ρ 0.2 and 0.4 in one process
    python bench/modegpt.py --ratios 0.2 --threads 1 --name modegpt_r0.2   # or one process per ratio,
    python bench/modegpt.py --ratios 0.4 --threads 1 --name modegpt_r0.4   # each with its own dense row,
    python bench/modegpt.py --merge modegpt_r0.2 modegpt_r0.4             # then merged into modegpt.json

At the first ratio MoDeGPT runs both without and with sequential calibration; the one with the
lower mean log validation perplexity is used at the other ratios. Writes
``bench/results/NAME.json`` (``_common.write_result``, after every row) and prints a table.
Times are measured one after the other in this run on a machine others share (see ``run.load_avg``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_info, write_result  # noqa: E402
from rankwise.compression.api import CompressConfig, compress  # noqa: E402
from rankwise.evaluation.perplexity import perplexity  # noqa: E402
from rankwise.io.models import load_model, load_tokenizer  # noqa: E402
from rankwise.io.texts import load_text  # noqa: E402

TEXTS = {"ptb_test": ("ptb", "test"), "bbc_test": ("bbc", "test"), "ptb_valid": ("ptb", "valid"),
         "bbc_valid": ("bbc", "valid")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-default", action="store_true", help="skip the default-pipeline rows")
    ap.add_argument("--rows", default=None,
                    help="explicit rows instead of the automatic plan: comma list of RATIO[s][d][v] (s: sequential, "
                    "d: the default pipeline instead of modegpt, v: validation texts only), e.g. 0.2,0.4,0.2sv")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (merge with a part that has it)")
    ap.add_argument("--in-place", action="store_true",
                    help="compress the loaded model itself (one row only; saves a model copy of RAM)")
    ap.add_argument("--speed", action="store_true",
                    help="instead: prefill/decode tokens/s of dense and modegpt at --ratios, measured alternately "
                    "(rankwise.evaluation.speed.measure_speed; calibration 8 windows, only the shapes matter)")
    ap.add_argument("--name", default="modegpt", help="bench/results/NAME.json")
    ap.add_argument("--merge", nargs="+", metavar="NAME", help="merge bench/results/NAME.json files into --name")
    args = ap.parse_args(argv)
    if args.merge:
        import json

        from _common import RESULTS

        parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in args.merge]
        dense = next(p["dense"] for p in parts if p["dense"])
        rows = [dict(r, process=n) for n, p in zip(args.merge, parts) for r in p["rows"]]
        for r in rows:
            r.update({f"x_dense_{k}": r[f"ppl_{k}"] / dense[k] for k in dense if f"ppl_{k}" in r})
        write_result(args.name, {"model": parts[0]["model"], "eval": parts[0]["eval"], "dense": dense,
                                 "rows": rows, "note": "merged from one process per part",
                                 "parts": {n: p["run"] for n, p in zip(args.merge, parts)}, "run": run_info()})
        _table(dense, rows)
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = run_info()
    ratios = [float(r) for r in args.ratios.split(",")]
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    if args.speed:
        return _speed(args, tok, base, ratios, info)
    texts = {k: load_text(name, split) for k, (name, split) in TEXTS.items()}

    def evaluate(model, valid_only: bool = False) -> dict[str, float]:
        return {k: perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens, name=k).perplexity
                for k, text in texts.items() if not (valid_only and k.endswith("_test"))}

    t = time.perf_counter()
    dense = {} if args.no_dense else evaluate(base)
    dense_s = time.perf_counter() - t
    print(f"dense: {dense} ({dense_s:.0f}s)", file=sys.stderr, flush=True)
    rows: list[dict] = []

    def row(tag: str, ratio: float, valid_only: bool = False, **fields) -> dict:
        config = CompressConfig(ratio=ratio, **fields)
        model = base if args.in_place else copy.deepcopy(base)
        res = compress(model, config, tokenizer=tok)
        t0 = time.perf_counter()
        ppl = {}
        for k, text in texts.items():  # a partial row after every text (a long run may be cut short)
            if valid_only and k.endswith("_test"):
                continue
            ppl[k] = perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens, name=k).perplexity
            write_result(args.name, {"model": args.model, "partial": {"tag": tag, "ratio": ratio, "sequential":
                                     res.sequential, "achieved_ratio": res.achieved_ratio, "compress_s": res.seconds,
                                     "timings": res.timings, **{f"ppl_{q}": v for q, v in ppl.items()}},
                                     "dense": dense, "rows": rows, "run": info})
            print(f"  {k}: {ppl[k]:.2f}", file=sys.stderr, flush=True)
        r = {"tag": tag, "ratio": ratio, "method": config.method, "alloc": config.alloc,
             "sequential": res.sequential, "calib": config.calib, "achieved_ratio": res.achieved_ratio,
             **{f"ppl_{k}": v for k, v in ppl.items()},
             **{f"x_dense_{k}": ppl[k] / dense[k] for k in ppl if k in dense},
             "compress_s": res.seconds, "timings": res.timings, "eval_s": time.perf_counter() - t0}
        rows.append(r)
        print(f"{tag:22s} ρ={ratio} seq={res.sequential} achieved={res.achieved_ratio:.4f} "
              + " ".join(f"{k}={v:.1f}" for k, v in ppl.items()) + f" ({res.seconds:.0f}s)", file=sys.stderr,
              flush=True)
        write_result(args.name, {"model": args.model, "eval": {"tokens": args.tokens, "seq_len": args.seq_len,
                                                               "bos": True, "texts": list(TEXTS)},
                                 "dense": dense, "dense_eval_s": dense_s, "rows": rows, "run": info})
        del model
        gc.collect()
        return r

    def valid_score(r: dict) -> float:
        return 0.5 * (math.log(r["ppl_ptb_valid"]) + math.log(r["ppl_bbc_valid"]))

    seq: bool | None = None
    if args.rows:
        for spec in args.rows.split(","):
            r = float(spec.rstrip("sdv"))
            fields = {} if "d" in spec else {"method": "modegpt", "sequential": "s" in spec}
            row("default pipeline" if "d" in spec else "modegpt", r, valid_only="v" in spec, **fields)
        ratios = []
    for ratio in ratios:
        if seq is None:
            a = row("modegpt", ratio, method="modegpt", sequential=False)
            b = row("modegpt", ratio, method="modegpt", sequential=True)
            seq = valid_score(b) < valid_score(a)
            print(f"modegpt: sequential={seq} chosen on validation", file=sys.stderr, flush=True)
        else:
            row("modegpt", ratio, method="modegpt", sequential=seq)
        if not args.no_default:
            row("default pipeline", ratio)
    for r in rows:
        r["chosen"] = seq is None or r["tag"] != "modegpt" or r["sequential"] == seq
    write_result(args.name, {"model": args.model, "eval": {"tokens": args.tokens, "seq_len": args.seq_len,
                                                           "bos": True, "texts": list(TEXTS)},
                             "dense": dense, "dense_eval_s": dense_s, "rows": rows, "run": info,
                             "modegpt_sequential_chosen_on_validation": seq})
    _table(dense, rows)
    return 0


def _speed(args, tok, base, ratios: list[float], info: dict) -> int:
    from rankwise.evaluation.speed import measure_speed, prompt_ids

    models = {"dense": base}
    compress_s = {}
    for r in ratios:
        m = copy.deepcopy(base)
        compress_s[f"modegpt {r}"] = compress(m, CompressConfig(ratio=r, method="modegpt", calib_samples=8),
                                              tokenizer=tok).seconds
        models[f"modegpt {r}"] = m
    ids = prompt_ids(tok, load_text("ptb", "valid"), 256, name="ptb valid")
    res = measure_speed(models, ids, new_tokens=32, repeats=3, warmup=1)
    out = {name: s.to_dict() for name, s in res.items()}
    d = res["dense"]
    ratios_out = {name: {"prefill_vs_dense": s.prefill_tokens_per_s / d.prefill_tokens_per_s,
                         "decode_vs_dense": (s.decode_tokens_per_s or 0) / (d.decode_tokens_per_s or 1),
                         "prefill_cpu_vs_dense": sorted(d.prefill_cpu_s)[len(d.prefill_cpu_s) // 2]
                         / sorted(s.prefill_cpu_s)[len(s.prefill_cpu_s) // 2],
                         "decode_cpu_vs_dense": sorted(d.decode_cpu_s)[len(d.decode_cpu_s) // 2]
                         / sorted(s.decode_cpu_s)[len(s.decode_cpu_s) // 2]}
                  for name, s in res.items()}
    write_result(args.name, {"model": args.model, "prompt_tokens": 256, "new_tokens": 32, "speed": out,
                             "vs_dense": ratios_out, "compress_s": compress_s, "run": info})
    for name, v in ratios_out.items():
        print(f"{name:14s} prefill {res[name].prefill_tokens_per_s:8.1f} tok/s ({v['prefill_vs_dense']:.2f}x, cpu "
              f"{v['prefill_cpu_vs_dense']:.2f}x)  decode {res[name].decode_tokens_per_s or 0:6.1f} tok/s "
              f"({v['decode_vs_dense']:.2f}x, cpu {v['decode_cpu_vs_dense']:.2f}x)")
    return 0


def _table(dense: dict, rows: list[dict]) -> None:
    print(f"\n{'row':22s} {'ρ':>4s} {'seq':>5s} " + " ".join(f"{k:>10s}" for k in TEXTS) + "  compress_s")
    print(f"{'dense':22s} {'':4s} {'':5s} " + " ".join(f"{dense.get(k, math.nan):10.2f}" for k in TEXTS))
    for r in rows:
        print(f"{r['tag']:22s} {r['ratio']:4.1f} {str(r['sequential']):>5s} "
              + " ".join(f"{r.get('ppl_' + k, math.nan):10.2f}" for k in TEXTS) + f"  {r['compress_s']:.0f}")


if __name__ == "__main__":
    raise SystemExit(main())

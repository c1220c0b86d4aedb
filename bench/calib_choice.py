"""Choice of the default calibration text on VALIDATION text only (issue 10, F item 4).

For each calibration spec (single texts, the equal mixture, weighted mixtures) the current
default pipeline (``CompressConfig()``'s defaults, only ``calib`` changes) compresses SmolLM2-135M
at ρ = 0.2 and 0.4; each model is evaluated on PTB valid and BBC valid (the text-disjoint BBC
slice, ``load_text('bbc', 'valid')``): the first 4,096 tokens, 512-token windows, BOS first.
Test text is never read. Score of a spec: the geometric mean of ppl / dense-ppl over the two
texts and the two ratios (lower is better); the recommended default is the lowest score.

    python bench/calib_choice.py                          # all specs (≈ 10 min per spec on a loaded 2-core box)
    python bench/calib_choice.py --specs ptb,ptb+bbc      # a subset
    python bench/calib_choice.py --merge a.json b.json    # combine runs made in several processes

Writes ``bench/results/calib_choice.json`` (after every row, atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _common import write_result
from rankwise.compression.api import CompressConfig, compress
from rankwise.evaluation.perplexity import perplexity
from rankwise.io.models import load_model, load_tokenizer
from rankwise.io.texts import load_text

SPECS = ("ptb+bbc", "ptb", "bbc", "ptb:3+bbc:1", "ptb:1+bbc:3")
RATIOS = (0.2, 0.4)
TEXTS = ("ptb", "bbc")


def score(rows: list[dict], spec: str) -> float | None:
    """Geometric mean of the degradation factors (ppl / dense) of ``spec`` over texts and ratios."""
    vals = [r[f"degr_{t}"] for r in rows if r["calib"] == spec for t in TEXTS]
    if len(vals) != len(TEXTS) * len(RATIOS):
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def summary(dense: dict, rows: list[dict]) -> dict:
    specs = list(dict.fromkeys(r["calib"] for r in rows))
    scores = {s: score(rows, s) for s in specs}
    done = {s: v for s, v in scores.items() if v is not None}
    best = min(done, key=done.get) if done else None
    return {"scores": scores, "recommended": best}


def table(dense: dict, rows: list[dict], summ: dict) -> None:
    print(f"dense (valid): PTB {dense['ptb']:.2f}  BBC {dense['bbc']:.2f}")
    print("| calibration | ρ | PTB valid | × dense | BBC valid | × dense | compress s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['calib']} | {r['ratio']} | {r['ppl_ptb']:.1f} | {r['degr_ptb']:.2f} | {r['ppl_bbc']:.1f} | "
              f"{r['degr_bbc']:.2f} | {r['compress_s']:.0f} |")
    print("\n| calibration | score (geo-mean × dense over PTB/BBC valid, ρ 0.2/0.4) |")
    print("|---|---|")
    for s, v in summ["scores"].items():
        print(f"| {s} | {'—' if v is None else f'{v:.3f}'} |")
    print(f"\nrecommended default: {summ['recommended']}")


def write(name: str, args, dense: dict, rows: list[dict], defaults: dict, note: str = "") -> dict:
    summ = summary(dense, rows)
    write_result(name, {
        "model": args.model,
        "eval": {"tokens": args.tokens, "seq_len": args.seq_len, "texts": ["ptb:valid", "bbc:valid"], "bos": True},
        "pipeline": defaults,
        "note": note or "validation text only; test text never read",
        "dense": dense,
        "rows": rows,
        **summ,
    })
    return summ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(SPECS), help="comma list of calibration specs")
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma list (the score needs 0.2 and 0.4)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    ap.add_argument("--name", default="calib_choice", help="result name under bench/results/")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge earlier result files")
    ap.add_argument("--dense-from", default=None, metavar="JSON",
                    help="reuse the dense valid perplexities of an earlier run's result file (same eval protocol) "
                    "instead of measuring them again")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for p in parts for r in p["rows"]]
        summ = write(args.name, args, parts[0]["dense"], rows, parts[0]["pipeline"],
                     note=f"merged from {len(parts)} runs (same commit's pipeline; validation text only)")
        table(parts[0]["dense"], rows, summ)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    defaults = {k: v for k, v in CompressConfig().to_dict().items() if k not in ("progress", "ratio", "calib")}
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    texts = {t: load_text(t, "valid") for t in TEXTS}

    def evaluate(model) -> dict:
        return {t: perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens,
                              name=f"{t}:valid", progress=False).perplexity for t, text in texts.items()}

    t = time.perf_counter()
    dense = json.loads(Path(args.dense_from).read_text())["dense"] if args.dense_from else evaluate(base)
    print(f"dense valid: {dense} ({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    rows: list[dict] = []
    for spec in args.specs.split(","):
        cache: dict = {}  # the dense statistics of this calibration, shared by its two ratios
        for ratio in (float(r) for r in args.ratios.split(",")):
            model = copy.deepcopy(base)
            res = compress(model, CompressConfig(ratio=ratio, calib=spec, progress=False), tokenizer=tok,
                           stats_cache=cache)
            t = time.perf_counter()
            ppl = evaluate(model)
            row = {"calib": spec, "ratio": ratio, "achieved_ratio": res.achieved_ratio,
                   "mixture": (res.calibration or {}).get("mixture"),
                   **{f"ppl_{k}": v for k, v in ppl.items()},
                   **{f"degr_{k}": ppl[k] / dense[k] for k in ppl},
                   "compress_s": res.seconds, "eval_s": time.perf_counter() - t}
            rows.append(row)
            print(f"{spec} ρ={ratio}: PTB {ppl['ptb']:.1f} ({row['degr_ptb']:.2f}×) BBC {ppl['bbc']:.1f} "
                  f"({row['degr_bbc']:.2f}×) [{res.seconds:.0f}s + {row['eval_s']:.0f}s]", file=sys.stderr, flush=True)
            del model
            gc.collect()
            summ = write(args.name, args, dense, rows, defaults)
    table(dense, rows, summ)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

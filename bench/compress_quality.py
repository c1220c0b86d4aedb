"""Quality of one-shot compression of SmolLM2-135M: perplexity on PTB test and BBC test.

Every configuration is measured in this one process against the baseline, SVD-LLM's setting
(``whiten`` + ``uniform`` allocation, no sequential calibration), computed in the same run.
Calibration: PTB train, 32 windows × 256 tokens, seed 0 (never test text). Evaluation: the
first 4,096 tokens of each test text in 512-token windows, BOS prepended (docs/methods.md §6).

    python bench/compress_quality.py            # --quick grid (default, < 25 min on 2 cores)
    python bench/compress_quality.py --full     # every method × {uniform, global, welore} × ±sequential × 4 ratios
    python bench/compress_quality.py --only "ratio=0.2,method=whiten,alloc=global,shrink=0.2"

Writes ``bench/results/compress_quality.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

from rankwise.compression.api import CompressConfig, compress
from rankwise.evaluation.perplexity import perplexity
from rankwise.io.atomic import atomic_file
from rankwise.io.models import load_model, load_tokenizer
from rankwise.io.texts import load_text

RATIOS = (0.1, 0.2, 0.3, 0.4)
BASELINE = {"method": "whiten", "alloc": "uniform", "sequential": False}
# the best pipeline found (also CompressConfig's defaults)
BEST = {
    "method": CompressConfig.method,
    "alloc": CompressConfig.alloc,
    "sequential": CompressConfig.sequential,
    "shrink": CompressConfig.shrink,
    "alloc_norm": CompressConfig.alloc_norm,
    "min_rank_frac": CompressConfig.min_rank_frac,
    "skip_first": CompressConfig.skip_first,
    "alloc_sensitivity": CompressConfig.alloc_sensitivity,
}


def quick_grid() -> list[dict]:
    grid = [{**BASELINE, "ratio": r, "tag": "baseline"} for r in RATIOS]
    grid += [{**BEST, "ratio": r, "tag": "best"} for r in RATIOS]
    ab = 0.2  # ablations at ρ = 0.2: one lever at a time, from the best pipeline
    grid += [
        {**BEST, "ratio": ab, "sequential": True, "tag": "best + sequential"},
    ]
    return grid


def full_grid() -> list[dict]:
    grid = [{**BASELINE, "ratio": r, "tag": "baseline"} for r in RATIOS]
    for r in RATIOS:
        for method in ("svd", "asvd", "fwsvd", "whiten"):
            for alloc in ("uniform", "global", "welore"):
                for seq in (False, True):
                    if method in ("svd", "fwsvd") and seq:
                        continue  # data-free / gradient statistics: sequential does not apply
                    grid.append({"ratio": r, "method": method, "alloc": alloc, "sequential": seq,
                                 "shrink": BEST["shrink"] if method == "whiten" else 0.0, "tag": "grid"})
        grid.append({**BEST, "ratio": r, "tag": "best"})
    return grid


def parse_only(spec: str) -> dict:
    out: dict = {"tag": "only"}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        k = k.strip()
        if v in ("True", "False"):
            out[k] = v == "True"
        else:
            try:
                out[k] = int(v) if v.isdigit() else float(v)
            except ValueError:
                out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="baseline and best at 4 ratios + ablations at 0.2 (default)")
    g.add_argument("--full", action="store_true", help="the whole grid (hours on 2 cores)")
    g.add_argument("--only", action="append", help="key=value,... one configuration (repeatable)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ratios", default=None,
                    help="comma list: only these ratios of the grid (e.g. to split the quick grid over two processes, "
                    "each with its own baseline; then --merge the JSON files)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge result files of earlier runs into --out and print the table (no measuring)")
    ap.add_argument("--no-baseline", action="store_true", help="with --only: skip the baseline at the same ratios")
    ap.add_argument("--out", default="bench/results/compress_quality.json")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default); 1 is much faster on a machine shared with other jobs")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [dict(r, process=i) for i, p in enumerate(parts) for r in p["rows"]]
        rows.sort(key=lambda r: (r["tag"] not in ("baseline", "best"), r["ratio"], r["tag"] != "baseline",
                                 r["process"]))
        _write(args, parts[0]["dense"], rows, note=f"merged from {len(parts)} processes; each row is compared "
               "with the baseline measured in its own process")
        _table(parts[0]["dense"], rows)
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.only:
        grid = [parse_only(s) for s in args.only]
        if not args.no_baseline:
            ratios = sorted({c.get("ratio", 0.2) for c in grid})
            grid = [{**BASELINE, "ratio": r, "tag": "baseline"} for r in ratios] + grid
    else:
        grid = full_grid() if args.full else quick_grid()
    if args.ratios:
        keep = {float(r) for r in args.ratios.split(",")}
        grid = [c for c in grid if c["ratio"] in keep]

    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    texts = {name: load_text(name, "test") for name in ("ptb", "bbc")}

    def evaluate(model) -> dict:
        return {
            name: perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens, name=name).perplexity
            for name, text in texts.items()
        }

    t = time.perf_counter()
    dense = evaluate(base)
    print(f"dense: {dense} ({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    caches: dict[tuple, dict] = {}
    rows = []
    for i, cfg in enumerate(grid):
        cfg = dict(cfg)
        tag = cfg.pop("tag")
        config = CompressConfig(**cfg)
        key = (config.method, config.calib, config.skip_first, config.calib_samples, config.seq_len, config.seed)
        model = copy.deepcopy(base)
        res = compress(model, config, tokenizer=tok, stats_cache=caches.setdefault(key, {}))
        t = time.perf_counter()
        ppl = evaluate(model)
        row = {
            "tag": tag,
            **{k: v for k, v in config.to_dict().items() if k not in ("progress", "targets", "exclude")},
            "achieved_ratio": res.achieved_ratio,
            "ppl_ptb": ppl["ptb"],
            "ppl_bbc": ppl["bbc"],
            "compress_s": res.seconds,
            "eval_s": time.perf_counter() - t,
            "dense_matrices": len(res.dense),
        }
        rows.append(row)
        print(f"[{i + 1}/{len(grid)}] {tag:36s} ρ={config.ratio} {config.method}/{config.alloc}"
              f" seq={res.sequential} shrink={config.shrink} → PTB {ppl['ptb']:.1f} BBC {ppl['bbc']:.1f}"
              f" ({res.seconds:.0f}s + {row['eval_s']:.0f}s)", file=sys.stderr, flush=True)
        del model
        gc.collect()
        _write(args, dense, rows)
    _table(dense, rows)
    return 0


def _baseline_of(rows: list[dict], row: dict) -> dict | None:
    return next((r for r in rows if r["tag"] == "baseline" and r["ratio"] == row["ratio"]
                 and r.get("process") == row.get("process")), None)


def _write(args, dense: dict, rows: list[dict], note: str = "") -> None:
    for r in rows:
        b = _baseline_of(rows, r)
        if b is not None:
            r["vs_baseline_ptb"] = r["ppl_ptb"] / b["ppl_ptb"]
            r["vs_baseline_bbc"] = r["ppl_bbc"] / b["ppl_bbc"]
        # degradation factors relative to dense; off-domain / on-domain
        r["degr_ptb"] = r["ppl_ptb"] / dense["ptb"]
        r["degr_bbc"] = r["ppl_bbc"] / dense["bbc"]
        r["offdomain_over_ondomain"] = r["degr_bbc"] / r["degr_ptb"]
    data = {
        "model": args.model,
        "eval": {"tokens": args.tokens, "seq_len": args.seq_len, "texts": ["ptb:test", "bbc:test"]},
        "calibration": "ptb train, 32 × 256 tokens, seed 0 (unless a row says otherwise)",
        "torch_threads": torch.get_num_threads(),
        "note": note,
        "dense": dense,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as fh:
        json.dump(data, fh, indent=2)


def _table(dense: dict, rows: list[dict]) -> None:
    print(f"dense: PTB {dense['ptb']:.2f}  BBC {dense['bbc']:.2f}")
    print(f"| {'configuration':36s} | ρ | achieved | PTB | BBC | PTB/base | BBC/base | BBC degr / PTB degr |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        desc = f"{r['tag']}: {r['method']}/{r['alloc']}"
        if r["alloc"] == "global":
            desc += "[fisher]" if r.get("alloc_sensitivity", "none") == "fisher" else f"[{r.get('alloc_norm')}]"
        desc += "/seq" if r["sequential"] else ""
        if r["shrink"]:
            desc += f"/shrink {r.get('shrink_target', 'diag')} {r['shrink']}"
        if r.get("skip_first"):
            desc += f"/skip first {r['skip_first']}"
        print(f"| {desc:36s} | {r['ratio']} | {r['achieved_ratio']:.3f} | {r['ppl_ptb']:.1f} | {r['ppl_bbc']:.1f} |"
              f" {r.get('vs_baseline_ptb', float('nan')):.2f} | {r.get('vs_baseline_bbc', float('nan')):.2f} |"
              f" {r['offdomain_over_ondomain']:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())

"""Output anchoring and block refinement on SmolLM2-135M, measured on *validation* text only.

Rows at one ratio, each compressed from the same dense model in this one process: the default
pipeline (CompressConfig's defaults), + sequential, + anchor + sequential, + anchor (alone; for
``whiten`` it equals the default, see tests/test_anchor.py), + refine. Perplexity on PTB valid
and BBC valid (``load_text('bbc', 'valid')``, a slice of BBC train), first 4,096 tokens,
512-token windows, BOS prepended; never the test texts (defaults are chosen on these numbers).

    python bench/levers_valid.py --ratio 0.2 --threads 1
    python bench/levers_valid.py --ratio 0.4 --rows default,anchor+seq --threads 1

Writes ``bench/results/levers_valid_r<ratio>.json`` (``_common.write_result``) and prints a table.
Compression times are measured in this run, one after the other, on a machine others share.
"""

from __future__ import annotations

import argparse
import copy
import gc
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

ROWS = {
    "default": {},
    "seq": {"sequential": True},
    "anchor": {"anchor": True},
    "anchor+seq": {"anchor": True, "sequential": True},
    "anchor+seq+iters2": {"anchor": True, "sequential": True, "anchor_iters": 2},
    "refine": {"refine_steps": 12},
    "anchor+seq+refine": {"anchor": True, "sequential": True, "refine_steps": 12},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--rows", default="default,seq,anchor+seq,refine", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--refine-lr", type=float, default=None, help="refine rows: Adam lr (default: the config's)")
    ap.add_argument("--refine-steps", type=int, default=None, help="refine rows: steps per block (default 12)")
    ap.add_argument("--dense-from", default=None, metavar="JSON",
                    help="take the dense perplexities from an earlier result of the same protocol (saves the eval)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=None, help="reduced protocol: calibration windows")
    ap.add_argument("--sens-samples", type=int, default=None, help="reduced protocol: loss-sensitivity windows")
    ap.add_argument("--cache", action="store_true",
                    help="share the dense statistics between rows (their spectra pass; the compress times then "
                    "exclude it after the first row)")
    ap.add_argument("--name", default=None, help="result name (default levers_valid_r<ratio>)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    info = run_info()
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    texts = {"ptb_valid": load_text("ptb", "valid"), "bbc_valid": load_text("bbc", "valid")}

    def evaluate(model) -> dict:
        return {k: perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens, name=k).perplexity
                for k, text in texts.items()}

    t = time.perf_counter()
    if args.dense_from:
        import json

        dense = json.loads(Path(args.dense_from).read_text())["dense"]
    else:
        dense = evaluate(base)
    print(f"dense: {dense} ({time.perf_counter() - t:.0f}s)", file=sys.stderr, flush=True)
    rows = []
    cache: dict = {}
    name = args.name or f"levers_valid_r{args.ratio:g}"
    for row in names:
        over = dict(ROWS[row])
        if args.refine_lr is not None and "refine_steps" in over:
            over["refine_lr"] = args.refine_lr
        if args.refine_steps is not None and "refine_steps" in over:
            over["refine_steps"] = args.refine_steps
        proto = {k: v for k, v in (("calib_samples", args.calib_samples), ("sens_samples", args.sens_samples))
                 if v is not None}
        config = CompressConfig(ratio=args.ratio, progress=False, **proto, **over)
        model = copy.deepcopy(base)
        res = compress(model, config, tokenizer=tok, stats_cache=cache if args.cache else None)
        t = time.perf_counter()
        ppl = evaluate(model)
        r = {"row": row, "ratio": args.ratio, "levers": over, "achieved_ratio": res.achieved_ratio,
             **{f"ppl_{k}": v for k, v in ppl.items()}, **{f"x_dense_{k}": v / dense[k] for k, v in ppl.items()},
             "compress_s": res.seconds, "timings": res.timings, "eval_s": time.perf_counter() - t,
             "refine": model.rankwise_meta.get("refine"), "config": config.to_dict()}
        rows.append(r)
        print(f"{row:20s} ρ={args.ratio} PTBv {ppl['ptb_valid']:.2f} ({r['x_dense_ptb_valid']:.3f}×) "
              f"BBCv {ppl['bbc_valid']:.2f} ({r['x_dense_bbc_valid']:.3f}×) compress {res.seconds:.0f}s",
              file=sys.stderr, flush=True)
        del model
        gc.collect()
        write_result(name, {"model": args.model, "eval": {"tokens": args.tokens, "seq_len": args.seq_len,
                                                           "texts": ["ptb:valid", "bbc:valid"]},
                            "protocol": {"calib_samples": args.calib_samples, "sens_samples": args.sens_samples,
                                         "stats_cache": args.cache},
                            "dense": dense, "rows": rows, "run": info})
    print("\n| row | ρ | PTB valid (× dense) | BBC valid (× dense) | compress s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['ratio']} | {r['ppl_ptb_valid']:.2f} ({r['x_dense_ptb_valid']:.3f}×) | "
              f"{r['ppl_bbc_valid']:.2f} ({r['x_dense_bbc_valid']:.3f}×) | {r['compress_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``rankwise compress``: one-shot low-rank compression of a model, saved as a rankwise checkpoint.

With only ``--out`` it runs the best pipeline we measured (the defaults of
:class:`rankwise.compression.api.CompressConfig`) on the built-in SmolLM2-135M
with PTB-train calibration. The output folder is written atomically: an error
or Ctrl-C leaves nothing behind, and an existing folder is refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import time

from rankwise.cli.common import console, ratio_arg, write_json
from rankwise.compression.api import CompressConfig
from rankwise.errors import RankwiseError

_D = CompressConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="built-in name, HF folder (default: smollm2-135m)")
    parser.add_argument("--ratio", type=ratio_arg, default=_D.ratio,
                        help=f"fraction of the targeted parameters to remove, in (0, 1) (default {_D.ratio})")
    parser.add_argument("--method", default=_D.method, choices=["svd", "asvd", "fwsvd", "whiten"],
                        help=f"factorisation method (default {_D.method})")
    parser.add_argument("--alloc", default=_D.alloc, choices=["uniform", "energy", "welore", "global"],
                        help=f"rank allocation (default {_D.alloc})")
    parser.add_argument("--calib", default=_D.calib,
                        help="calibration text, train split: ptb, bbc, a mixture like ptb+bbc, or FILE.txt "
                        f"(default {_D.calib})")
    parser.add_argument("--calib-samples", type=int, default=_D.calib_samples,
                        help=f"calibration windows (default {_D.calib_samples})")
    parser.add_argument("--seq-len", type=int, default=_D.seq_len,
                        help=f"tokens per calibration window (default {_D.seq_len})")
    parser.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=_D.sequential,
                        help="calibrate block ℓ on the outputs of the compressed blocks < ℓ "
                        f"(default {'on' if _D.sequential else 'off'})")
    parser.add_argument("--seed", type=int, default=_D.seed, help="calibration sampling seed")
    parser.add_argument("--shrink", type=float, default=_D.shrink,
                        help=f"whiten: shrink XᵀX toward its diagonal by this fraction (default {_D.shrink})")
    parser.add_argument("--shrink-target", default=_D.shrink_target, choices=["diag", "identity"],
                        help=f"whiten: shrink toward diag(XᵀX) or a scaled identity (default {_D.shrink_target})")
    parser.add_argument("--alloc-norm", default=_D.alloc_norm, choices=["none", "total", "log"],
                        help=f"global allocation: normalisation of each matrix's σ² (default {_D.alloc_norm})")
    parser.add_argument("--alloc-sensitivity", default=_D.alloc_sensitivity, choices=["none", "fisher"],
                        help="global allocation: weight each matrix's σ² by its mean squared output gradient "
                        f"(default {_D.alloc_sensitivity})")
    parser.add_argument("--min-rank-frac", type=float, default=_D.min_rank_frac,
                        help="global allocation: no matrix below this fraction of the uniform rank "
                        f"(default {_D.min_rank_frac})")
    parser.add_argument("--targets", default=None, help="regex of module names to compress (default: all linears)")
    parser.add_argument("--exclude", default=None, help="regex of module names to leave alone")
    parser.add_argument("--out", required=True, help="output folder (a rankwise checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--export-dense", default=None, metavar="DIR",
                        help="also write a plain HF folder (B A multiplied out) that from_pretrained loads")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON ('-' = stdout)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import rankwise
    from rankwise.compression.api import compress
    from rankwise.io.atomic import atomic_outputs
    from rankwise.io.models import load_model, load_tokenizer

    out = Path(args.out).expanduser()
    if args.export_dense and Path(args.export_dense).expanduser().resolve() == out.resolve():
        raise RankwiseError("--export-dense must differ from --out.")
    # every output checked now, written under temporary names and put in place together at the end
    outputs = atomic_outputs(dirs=[args.out, args.export_dense], files=[args.json], overwrite=args.overwrite)
    if args.calib_samples < 1:
        raise RankwiseError(f"--calib-samples must be at least 1, got {args.calib_samples}.")
    if args.seq_len < 2:
        raise RankwiseError(f"--seq-len must be at least 2, got {args.seq_len}.")
    config = CompressConfig(
        ratio=args.ratio, method=args.method, alloc=args.alloc, sequential=args.sequential, calib=args.calib,
        calib_samples=args.calib_samples, seq_len=args.seq_len, seed=args.seed, shrink=args.shrink,
        shrink_target=args.shrink_target,
        alloc_norm=args.alloc_norm, alloc_sensitivity=args.alloc_sensitivity,
        min_rank_frac=args.min_rank_frac, targets=args.targets, exclude=args.exclude,
    )
    t0 = time.perf_counter()
    with console.status(f"loading {args.model or 'smollm2-135m'} …"):
        model = load_model(args.model)
        tok = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    console.print(
        f"compressing with [bold]{config.method}[/bold] + [bold]{config.alloc}[/bold] allocation, "
        f"ratio {config.ratio}, {'sequential' if config.sequential else 'one-pass'} calibration on "
        f"{config.calib} ({config.calib_samples}×{config.seq_len} tokens, seed {config.seed})"
    )
    result = compress(model, config, tokenizer=tok)
    t1 = time.perf_counter()
    with console.status(f"saving {out} …"), outputs:
        rankwise.save(model, out, tokenizer=tok, overwrite=args.overwrite)
        if args.export_dense:
            rankwise.export_dense(model, args.export_dense, tokenizer=tok, overwrite=args.overwrite)
        if args.json and args.json != "-":
            write_json({**result.to_dict(), "out": str(out)}, args.json)
    save_s = time.perf_counter() - t1
    _table(result, load_s, save_s, Path(out), args.export_dense)
    if args.json == "-":
        write_json({**result.to_dict(), "out": str(out)}, args.json)
    return 0


def _table(result, load_s: float, save_s: float, out, dense_dir) -> None:
    from rich.table import Table

    n_low = sum(1 for r in result.ranks.values() if r is not None)
    table = Table(title="rankwise compress", show_header=True)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("method / allocation", f"{result.method} / {result.alloc}"
                  + (" / sequential" if result.sequential else ""))
    table.add_row("params before", f"{result.params_before:,}")
    table.add_row("params after", f"{result.params_after:,}")
    table.add_row("targeted params before → after",
                  f"{result.targeted_params_before:,} → {result.targeted_params_after:,}")
    table.add_row("asked ratio", f"{result.asked_ratio:.3f}")
    table.add_row("achieved ratio (of targeted params)", f"{result.achieved_ratio:.4f}")
    table.add_row("factorised / kept dense", f"{n_low} / {len(result.dense)}")
    if result.calibration:
        c = result.calibration
        table.add_row("calibration", f"{c.get('text')} ({c.get('samples')}×{c.get('seq_len')}, seed {c.get('seed')})")
    table.add_row("time: load / compress / save", f"{load_s:.1f} s / {result.seconds:.1f} s / {save_s:.1f} s")
    table.add_row("written", str(out) + (f" (+ dense {dense_dir})" if dense_dir else ""))
    console.print(table)

"""``rankwise inspect``: per-matrix spectra and metrics as a table, JSON and a self-contained HTML report."""

from __future__ import annotations

import argparse
import time

from rankwise.cli.common import console, ratio_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rankwise inspect``."""
    parser.add_argument(
        "model", nargs="?", default=None,
        help="built-in name (smollm2-135m, minilm-l6), a model folder, a rankwise checkpoint or a cached hub id "
        "(default: smollm2-135m)",
    )
    parser.add_argument("--targets", default=None, metavar="REGEX", help="only modules whose name matches REGEX")
    parser.add_argument("--exclude", default=None, metavar="REGEX", help="drop modules whose name matches REGEX")
    parser.add_argument("--json", default=None, metavar="PATH|-", help="write the report as JSON ('-' = stdout)")
    parser.add_argument("--html", default=None, metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--farms", action="store_true", help="also fit α on FARMS (fixed aspect ratio) submatrices")
    parser.add_argument(
        "--compare", default=None, metavar="TUNED_MODEL",
        help="a fine-tuned version of MODEL: adds intruder dimensions and relative spectral change per matrix",
    )
    parser.add_argument(
        "--ratio", type=ratio_arg, default=0.2,
        help="compression ratio for the WeLore LRC/N-LRC classes (fraction of parameters removed, default 0.2)",
    )
    parser.add_argument("--min-saving", type=float, default=0.1, help="WeLore: smallest saving of an LRC (0.1)")
    parser.add_argument("--intruder-eps", type=float, default=0.5, help="cosine threshold of an intruder (0.5)")
    parser.add_argument("--intruder-top", type=int, default=10, help="top singular vectors checked (10)")
    parser.add_argument(
        "--spectrum", choices=("gram", "svd"), default="gram",
        help="how singular values are computed: float64 Gram eigenvalues (default, fast) or float32 svdvals",
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads for the decompositions (default 1, robust on busy machines; 0 = torch's default)",
    )
    parser.add_argument("--max-rows", type=int, default=None, help="show at most this many table rows")
    parser.add_argument("--quiet", action="store_true", help="no table and no progress bar")


def run(args: argparse.Namespace) -> int:
    """Compute the report, print the table (stderr) and write the requested outputs."""
    from rankwise.inspection.api import InspectConfig, inspect
    from rankwise.io.atomic import check_writable

    try:  # our own progress bar replaces transformers' "Loading weights" bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if args.json and args.json != "-":
        check_writable(args.json)
    if args.html:
        check_writable(args.html)
    cfg = InspectConfig(
        targets=args.targets,
        exclude=args.exclude,
        ratio=args.ratio,
        min_saving=args.min_saving,
        farms=args.farms,
        compare=args.compare,
        intruder_eps=args.intruder_eps,
        intruder_top=args.intruder_top,
        progress=not args.quiet,
        spectrum_method=args.spectrum,
        threads=args.threads,
    )
    t0 = time.perf_counter()
    report = inspect(args.model, cfg)
    elapsed = time.perf_counter() - t0
    if not args.quiet:
        out = console
        if not console.is_terminal:  # piped / logged: do not squeeze the table into 80 columns
            from rich.console import Console

            out = Console(stderr=True, width=max(console.width, 150))
        out.print(report.table(max_rows=args.max_rows))
        console.print(f"[dim]computed in {elapsed:.1f} s (model load included)[/dim]")
    if args.json:
        report.write_json(args.json)
        if args.json != "-" and not args.quiet:
            console.print(f"wrote {args.json}")
    if args.html:
        report.write_html(args.html)
        if not args.quiet:
            console.print(f"wrote {args.html}")
    return 0

"""``rankwise inspect``: per-matrix spectra and metrics as a table, JSON and a self-contained HTML report.

The options come from :class:`rankwise.inspection.config.InspectConfig` (one source of defaults).
"""

from __future__ import annotations

import argparse
import time

from rankwise.cli.common import positive_int
from rankwise.config import add_config_arguments, config_from_args
from rankwise.inspection.config import InspectConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rankwise inspect``."""
    parser.add_argument(
        "model", nargs="?", default=None,
        help="built-in name (smollm2-135m, minilm-l6), a model folder, a rankwise checkpoint or a cached hub id "
        "(default: smollm2-135m); a folder with safetensors is read one tensor at a time",
    )
    add_config_arguments(parser, InspectConfig)
    parser.add_argument("--json", default=None, metavar="PATH|-", help="write the report as JSON ('-' = stdout)")
    parser.add_argument("--html", default=None, metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--max-rows", type=positive_int("--max-rows"), default=None,
                        help="show at most this many table rows")


def run(args: argparse.Namespace) -> int:
    """Compute the report, print the table (stderr) and write the requested outputs."""
    from rankwise.cli.common import console
    from rankwise.inspection.api import inspect
    from rankwise.io.atomic import atomic_outputs

    try:  # our own progress bar replaces transformers' "Loading weights" bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    outputs = atomic_outputs(files=[args.json, args.html])  # both checked now, put in place together at the end
    quiet = bool(getattr(args, "quiet", False))
    cfg = config_from_args(InspectConfig, args, progress=not quiet)
    t0 = time.perf_counter()
    report = inspect(args.model, cfg)
    elapsed = time.perf_counter() - t0
    if not quiet:
        out = console
        if not console.is_terminal:  # piped / logged: do not squeeze the table into 80 columns
            from rich.console import Console

            out = Console(stderr=True, width=max(console.width, 150))
        out.print(report.table(max_rows=args.max_rows))
        how = "streamed tensor by tensor" if report.settings.get("streamed") else "model loaded whole"
        console.print(f"[dim]computed in {elapsed:.1f} s ({how}, load included; "
                      f"{report.settings['threads']} thread(s), {report.settings['device']})[/dim]")
        for note in report.settings.get("notes", []):
            console.print(f"[dim]note: {note}[/dim]")
    with outputs:
        if args.json:
            report.write_json(args.json)
        if args.html:
            report.write_html(args.html)
    for path in (p for p in (args.json, args.html) if p and p != "-"):
        if not quiet:
            console.print(f"wrote {path}")
    return 0

"""``rankwise eval``: perplexity, size and (optionally) speed of one or several dense or compressed models.

All models named (and ``--compare DENSE``) are loaded into this one process and
measured side by side (perplexity on the same windows; speed alternately, so
machine noise hits all alike); ``--plot FILE.png`` draws perplexity against bytes
on disk and against prefill tokens/s. The work is :func:`rankwise.evaluation.api.evaluate`;
options come from :class:`rankwise.evaluation.config.EvalConfig`. JSON keys: docs/eval.md.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from rankwise.config import add_config_arguments, config_from_args
from rankwise.evaluation.config import EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models",
        nargs="*",
        default=["smollm2-135m"],
        metavar="MODEL_OR_DIR",
        help="built-in names (smollm2-135m), Hugging Face folders or rankwise checkpoints, measured side by side "
             "in one process (default: smollm2-135m)",
    )
    add_config_arguments(parser, EvalConfig)
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON ('-' = stdout)")


@contextlib.contextmanager
def _hf_bars(enabled: bool) -> Iterator[None]:
    """transformers' own "Loading weights" bar follows --quiet too (its switch ignores TQDM_DISABLE)."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _fmt_int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _fmt_mb(v: int | float | None) -> str:
    return "-" if v is None else f"{v / 2**20:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from rankwise.cli.common import console, write_json
    from rankwise.evaluation.api import evaluate
    from rankwise.io.atomic import atomic_outputs

    cfg = config_from_args(EvalConfig, args)
    outputs = atomic_outputs(files=[args.json, cfg.plot])  # checked now, before any model loads
    models = args.models or ["smollm2-135m"]
    quiet = bool(getattr(args, "quiet", False))
    with outputs, _hf_bars(not quiet):  # the plot and the JSON are put in place together, or neither
        out = evaluate(models, cfg)
        _print_table(out)
        write_json(out, args.json)
    if out["plot"] and not getattr(args, "quiet", False):
        console.print(f"wrote {out['plot']}")
    return 0


def _print_table(out: dict[str, Any]) -> None:
    from rich.table import Table

    from rankwise.cli.common import console

    models = out["models"]
    s = out["settings"]
    table = Table(title=f"rankwise eval: test split, {s['seq_len']}-token windows, ≤{s['tokens']} tokens per text")
    table.add_column("")
    for m in models:
        table.add_column(f"{m['model']} ({m['kind']})", justify="right")
    if out["comparison"]:
        table.add_column("ratio", justify="right")
    cmp = out["comparison"] or {}

    def row(label: str, vals: list[str], r: float | None = None) -> None:
        extra = [("-" if r is None else f"{r:.3f}×")] if out["comparison"] else []
        table.add_row(label, *vals, *extra)

    for t in s["texts"]:
        row(f"perplexity {t}", [f"{m['perplexity'][t]['perplexity']:.2f}" for m in models],
            cmp.get("perplexity_ratio", {}).get(t))
        row(f"  windows × tokens ({t})",
            [f"{m['perplexity'][t]['windows']} × {m['perplexity'][t]['seq_len']} = {m['perplexity'][t]['tokens']}"
             for m in models])
    row("parameters", [_fmt_int(m["size"]["params"]) for m in models], cmp.get("params_ratio"))
    row("factorised layers", [str(m["size"]["factorised_layers"]) for m in models])
    if any(m["size"].get("select_layers") for m in models):
        row("select layers (MoDeGPT)", [str(m["size"].get("select_layers", 0)) for m in models])
    row("bytes on disk", [_fmt_mb(m["size"]["disk_bytes"]) for m in models], cmp.get("disk_bytes_ratio"))
    row("factorised layers slower than dense (cost model, prefill/decode)",
        [f"{len(m['slow_layers']['prefill'])}/{len(m['slow_layers']['decode'])}" for m in models])
    if s["speed"]:
        sp = s["speed"]
        row(f"prefill tok/s ({sp['prompt_tokens']} tokens)",
            [f"{m['speed']['prefill_tokens_per_s']:.1f}" for m in models], cmp.get("prefill_speedup"))
        row(f"decode tok/s ({sp['new_tokens']} new)",
            ["-" if m["speed"]["decode_tokens_per_s"] is None else f"{m['speed']['decode_tokens_per_s']:.1f}"
             for m in models], cmp.get("decode_speedup"))
        row(f"peak memory ({models[0]['speed']['memory_kind']})",
            [f"{m['speed']['peak_memory_mb']:,.0f} MB" for m in models])
    console.print(table)
    where = s["device"] or f"device map {s['device_map']}"
    console.print(f"[dim]{s['threads']} threads, {where}, dtype {s['dtype']}"
                  + (f"; speed: median of {s['speed']['repeats']} alternating runs after {s['speed']['warmup']} "
                     "warm-up, one process; RSS peak is process-wide" if s["speed"] else "") + ".[/dim]")

"""``rankwise eval``: perplexity, size and (optionally) speed of a dense or compressed model.

With ``--compare DENSE`` both models are loaded into this one process and
measured side by side (perplexity on the same windows; speed alternately, so
machine noise hits both alike). The JSON keys are documented in docs/eval.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rankwise.cli.common import console, positive_int, split_list, write_json
from rankwise.errors import RankwiseError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default="smollm2-135m",
        metavar="MODEL_OR_DIR",
        help="built-in name (smollm2-135m), a Hugging Face folder or a rankwise checkpoint (default: smollm2-135m)",
    )
    parser.add_argument("--text", default="ptb", type=split_list,
                        help="comma-separated eval texts: ptb, bbc or FILE.txt (test splits; default: ptb)")
    parser.add_argument("--tokens", type=positive_int("--tokens"), default=4096,
                        help="token budget per text (default: 4096)")
    parser.add_argument("--seq-len", type=positive_int("--seq-len"), default=512,
                        help="window length; non-overlapping windows, BOS prepended (default: 512)")
    parser.add_argument("--speed", action="store_true",
                        help="also measure prefill and decode tokens/s and peak memory")
    parser.add_argument("--prompt-tokens", type=positive_int("--prompt-tokens"), default=512,
                        help="prefill prompt length for --speed, taken from the first --text (default: 512)")
    parser.add_argument("--new-tokens", type=positive_int("--new-tokens"), default=64,
                        help="greedy tokens decoded with the KV cache for --speed (default: 64)")
    parser.add_argument("--repeats", type=positive_int("--repeats"), default=5,
                        help="timed repeats for --speed, median reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds for --speed (default: 1)")
    parser.add_argument("--threads", type=positive_int("--threads"), default=None,
                        help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--compare", metavar="DENSE", default=None,
                        help="a second (usually the dense) model measured side by side in this process")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON ('-' = stdout)")


def _load(name: str) -> tuple[Any, Any, Path, str]:
    from rankwise.io.models import is_rankwise_checkpoint, load_model, load_tokenizer, resolve_model

    path = resolve_model(name)
    kind = "rankwise" if is_rankwise_checkpoint(path) else "dense"
    with console.status(f"loading {name} …"):
        model = load_model(name)
        try:
            tok = load_tokenizer(name)
        except (OSError, ValueError) as exc:
            raise RankwiseError(f"{path} has no usable tokenizer files ({str(exc).splitlines()[0][:100]}); "
                                "save the tokenizer with the model.") from exc
    return model, tok, path, kind


def _fmt_int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _fmt_mb(v: int | float | None) -> str:
    return "-" if v is None else f"{v / 2**20:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from rankwise import __version__
    from rankwise.evaluation.perplexity import perplexity
    from rankwise.evaluation.report import size_report
    from rankwise.evaluation.speed import slow_layers
    from rankwise.io.texts import load_text

    if args.warmup < 0:
        raise RankwiseError(f"--warmup must be 0 or more, got {args.warmup}.")
    from rankwise.io.atomic import atomic_outputs

    outputs = atomic_outputs(files=[args.json])  # checked now, before any model loads
    t_start = time.time()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    texts = {spec: load_text(spec, "test") for spec in args.text}  # unknown text fails before any model loads
    names = [args.model] + ([args.compare] if args.compare else [])
    labels = ["model", "compare"][: len(names)]
    loaded = {lab: _load(name) for lab, name in zip(labels, names)}

    entries: dict[str, dict[str, Any]] = {}
    for lab, name in zip(labels, names):
        model, tok, path, kind = loaded[lab]
        meta = getattr(model, "rankwise_meta", None) or {}
        entries[lab] = {
            "label": lab,
            "model": name,
            "path": str(path),
            "kind": kind,
            "compression": {k: v for k, v in meta.items() if k not in ("layers", "ranks")} or None,
            "size": size_report(model, path).to_dict(),
            "slow_layers": {"prefill": sorted(slow_layers(model, tokens=512)),
                            "decode": sorted(slow_layers(model, tokens=1))},
            "perplexity": {},
            "speed": None,
        }

    for spec, text in texts.items():
        for lab in labels:
            model, tok, _, _ = loaded[lab]
            res = perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens,
                             name=f"{spec} ({lab})" if len(labels) > 1 else spec, progress=True)
            d = res.to_dict()
            d["text"] = spec
            entries[lab]["perplexity"][spec] = d

    speed_settings = None
    if args.speed:
        from rankwise.evaluation.speed import measure_speed, prompt_ids

        first = args.text[0]
        tok0 = loaded[labels[0]][1]
        ids = prompt_ids(tok0, texts[first], args.prompt_tokens, name=first)
        res = measure_speed({lab: loaded[lab][0] for lab in labels}, ids, new_tokens=args.new_tokens,
                            repeats=args.repeats, warmup=args.warmup, progress=True)
        for lab in labels:
            entries[lab]["speed"] = res[lab].to_dict()
        speed_settings = {"prompt_text": first, "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens,
                          "repeats": args.repeats, "warmup": args.warmup, "statistic": "median"}

    out: dict[str, Any] = {
        "rankwise_version": __version__,
        "settings": {"texts": list(args.text), "split": "test", "tokens": args.tokens, "seq_len": args.seq_len,
                     "speed": speed_settings},
        "models": [entries[lab] for lab in labels],
        "comparison": _comparison(entries) if len(labels) > 1 else None,
        "seconds": round(time.time() - t_start, 2),
    }
    _print_table(out)
    with outputs:
        write_json(out, args.json)
    return 0


def _comparison(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios model / compare (e.g. compressed / dense): perplexity, parameters, bytes, speed."""
    a, b = entries["model"], entries["compare"]

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x is None or y in (None, 0) else x / y

    cmp: dict[str, Any] = {
        "perplexity_ratio": {t: ratio(a["perplexity"][t]["perplexity"], b["perplexity"][t]["perplexity"])
                             for t in a["perplexity"]},
        "params_ratio": ratio(a["size"]["params"], b["size"]["params"]),
        "disk_bytes_ratio": ratio(a["size"]["disk_bytes"], b["size"]["disk_bytes"]),
        "prefill_speedup": None,
        "decode_speedup": None,
    }
    if a["speed"] and b["speed"]:
        cmp["prefill_speedup"] = ratio(a["speed"]["prefill_tokens_per_s"], b["speed"]["prefill_tokens_per_s"])
        cmp["decode_speedup"] = ratio(a["speed"]["decode_tokens_per_s"], b["speed"]["decode_tokens_per_s"])
    return cmp


def _print_table(out: dict[str, Any]) -> None:
    from rich.table import Table

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
    row("bytes on disk", [_fmt_mb(m["size"]["disk_bytes"]) for m in models], cmp.get("disk_bytes_ratio"))
    row("layers slower than dense (prefill/decode)",
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
    if s["speed"]:
        console.print(f"[dim]speed: median of {s['speed']['repeats']} alternating runs after {s['speed']['warmup']} "
                      f"warm-up, {models[0]['speed']['threads']} threads, one process; RSS peak is process-wide.[/dim]")

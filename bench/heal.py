"""``+ healing`` rows: SmolLM2-135M compressed by the default pipeline, then healed (``heal_steps``), test perplexity.

For each ρ the default pipeline (``CompressConfig()``; only ``ratio`` and the ``--set`` overrides change)
compresses a copy of the dense model; the training-free model is evaluated, then healed in place
(:func:`rankwise.compression.heal.heal`: PEFT LoRA on each factor, ``--steps`` optimizer steps on the
calibration spec's train split, folded back) and evaluated again. Perplexity on PTB test and BBC test:
the first ``--tokens`` tokens, 512-token windows, BOS first (the README protocol); healing is reported in
its own rows. Nothing here is tuned on test text: the healing settings are the CompressConfig defaults.

    python bench/heal.py --ratios 0.2,0.4 --steps 20
    python bench/heal.py --merge a.json b.json       # combine runs made in several processes

Writes ``bench/results/heal.json`` (after every ρ) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from _common import parse_kv, write_result  # noqa: E402
from rankwise.compression.api import CompressConfig, compress
from rankwise.compression.heal import heal
from rankwise.evaluation.perplexity import perplexity
from rankwise.io.models import load_model, load_tokenizer
from rankwise.io.texts import load_text

TEXTS = ("ptb", "bbc")


def table(dense: dict, rows: list[dict]) -> None:
    print(f"dense (test): PTB {dense['ptb']:.2f}  BBC {dense['bbc']:.2f}")
    print("| pipeline | ρ | PTB test | × dense | BBC test | × dense | compress s | heal s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for tag, key in (("training-free", "free"), (f"+ healing ({r['heal_steps']} steps)", "healed")):
            p = r[key]
            print(f"| {tag} | {r['ratio']} | {p['ptb']:.1f} | {p['ptb'] / dense['ptb']:.2f} | {p['bbc']:.1f} | "
                  f"{p['bbc'] / dense['bbc']:.2f} | {r['compress_s']:.0f} | "
                  f"{r['heal_s'] if key == 'healed' else 0:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--steps", type=int, default=20, help="heal_steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other CompressConfig fields")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="heal")
    ap.add_argument("--dense-from", default=None, metavar="JSON", help="reuse dense test perplexities of a result")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["ratio"])
        write_result(args.name, {**{k: v for k, v in parts[0].items() if k not in ("rows", "run")}, "rows": rows,
                                 "note": f"merged from {len(parts)} runs"})
        table(parts[0]["dense"], rows)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    texts = {t: load_text(t, "test") for t in TEXTS}

    def evaluate(model) -> dict:
        return {t: perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens, name=f"{t}:test",
                              progress=False).perplexity for t, text in texts.items()}

    dense = json.loads(Path(args.dense_from).read_text())["dense"] if args.dense_from else evaluate(base)
    print(f"dense test: {dense}", file=sys.stderr, flush=True)
    rows: list[dict] = []
    extra = parse_kv(",".join(args.set))
    for ratio in (float(r) for r in args.ratios.split(",")):
        config = CompressConfig(**{**extra, "ratio": ratio, "heal_steps": args.steps, "progress": False})
        model = copy.deepcopy(base)
        res = compress(model, config.__class__(**{**config.to_dict(), "heal_steps": 0}), tokenizer=tok)
        free = evaluate(model)
        print(f"ρ={ratio} training-free: {free} ({res.seconds:.0f}s)", file=sys.stderr, flush=True)
        h = heal(model, config, tokenizer=tok)
        healed = evaluate(model)
        print(f"ρ={ratio} + healing {args.steps}: {healed} ({h.seconds:.0f}s, loss {h.first_loss:.3f} → "
              f"{h.final_loss:.3f})", file=sys.stderr, flush=True)
        rows.append({"ratio": ratio, "achieved_ratio": res.achieved_ratio, "heal_steps": args.steps,
                     "free": free, "healed": healed, "healing": h.to_dict(), "compress_s": res.seconds,
                     "heal_s": h.seconds, "params_after": res.params_after})
        write_result(args.name, {
            "model": args.model,
            "eval": {"tokens": args.tokens, "seq_len": args.seq_len, "texts": ["ptb:test", "bbc:test"], "bos": True},
            "pipeline": {k: v for k, v in config.to_dict().items() if k not in ("progress", "ratio")},
            "dense": dense, "rows": rows,
            "note": "healing = LoRA on each factor, folded back (ranks and parameter count unchanged)",
        })
        del model
        gc.collect()
    table(dense, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quality of one-shot compression of SmolLM2-135M: perplexity of every pipeline lever, side by side.

Rows are configuration dicts passed to ``CompressConfig(**row)`` (so a new lever is a new key):

* ``svd-llm``: SVD-LLM's setting (whiten + uniform ranks, PTB calibration, no guard);
* ``today``: the default of round 2 (whiten + loss-weighted global allocation, PTB calibration);
* each new lever alone on top of ``today``: ``+anchor`` (output-anchored B; it needs sequential
  calibration to differ from whitened truncation, so the row is anchor + sequential), ``+refine``
  (block refinement), ``+calib`` (calibration mixture ptb+bbc), ``+guard`` (speed guard);
* ``new default``: ``CompressConfig()``'s defaults as they are in the tree (or ``--new-default``): since round 5
  ``method="auto"``, i.e. MoDeGPT on SmolLM2 (the row records the method it ran and why);
* ``r4``: round 4's default (whiten + loss-weighted global allocation, ptb+bbc calibration, speed guard);
  ``new+refine``: ``r4`` + block refinement (``--refine-steps``/``--refine-lr``; refinement adapts factors);
* ``modegpt``: MoDeGPT; ``+healing``: ``r4`` + LoRA healing (reported apart: it trains; healing adapts factors,
  which MoDeGPT does not make).

Rows whose fields do not exist in ``CompressConfig`` (yet) are skipped with a printed note.
Evaluation: the first 4,096 tokens of PTB and BBC of the chosen split(s) in 512-token windows,
BOS prepended; ``--split valid`` (PTB valid + the BBC valid slice: choose defaults on these) or
``test`` (the tables), or ``valid,test`` (each model compressed once, evaluated on both);
``--test-only svd-llm,today`` evaluates those rows on the test split alone (they are no candidates for a
default, so their validation numbers would only cost time). ``--dense-from RUN.json`` takes the dense
perplexities from an earlier run with the same model and protocol instead of measuring them again.
Calibration is always train text (the row's ``calib``; CompressConfig's default ptb+bbc unless a row names
one). Reduced grid by default (the CPU is shared by 8 engineers): all
rows at ρ = 0.2 and 0.4, ``svd-llm`` and ``new default`` also at ρ = 0.1, 0.3, 0.5 (``--all-ratios``
for every row at every ρ). Non-sequential rows with the same method and calibration share one
calibration pass (``stats_cache``); their ``compress_s`` then excludes it (``cached`` in the row). Rows with block
refinement read the cache only in the spectra pass (their factorisation pass walks the data: it needs the blocks'
inputs); the cache holds the dense model's statistics (non-sequential walks feed every block dense inputs).
With ``--time-goal``, at ρ = 0.2 ``today`` and ``new default`` never read the cache, so their times compare (goal: new ≤
2× today; process CPU seconds are recorded beside wall seconds, the machine is shared). A row whose
resolved configuration equals an earlier row's at the same ρ is not recomputed (``same_as``).

    python bench/compress_quality.py --split valid --threads 1
    python bench/compress_quality.py --split test --rows svd-llm,new --ratios 0.1,0.3,0.5 --out part2.json
    python bench/compress_quality.py --merge part1.json part2.json --out bench/results/compress_quality.json

Writes JSON through ``bench/_common.write_result`` (commit, threads, load) after every row, and
prints a table with the goals marked.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_kv, run_info, write_result  # noqa: E402
from rankwise.compression.api import CompressConfig, compress  # noqa: E402
from rankwise.evaluation.perplexity import perplexity  # noqa: E402
from rankwise.io.models import load_model, load_tokenizer  # noqa: E402
from rankwise.io.texts import load_text  # noqa: E402

ALL_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
REDUCED_RATIOS = (0.2, 0.4)
TEXTS = ("ptb", "bbc")
# goals of issue 10 for training-free rows: ρ → (PTB, BBC) perplexity ≤ factor × dense
GOALS = {0.2: (1.25, 1.6), 0.4: (2.0, 3.0)}
TIME_GOAL = 2.0  # new default compress time ≤ 2× today's

SVD_LLM = {"method": "whiten", "alloc": "uniform", "sequential": False, "calib": "ptb", "speed_guard": "off"}
# round 2's default pipeline, written out (the dataclass defaults move on)
TODAY = {"method": "whiten", "alloc": "global", "sequential": False, "calib": "ptb", "alloc_norm": "none",
         "alloc_sensitivity": "fisher", "shrink": 0.0, "min_rank_frac": 0.0, "skip_first": 0, "speed_guard": "off"}


def rows_spec(args) -> dict[str, dict]:
    """Tag → configuration dict (before the ratio). ``new`` comes from the dataclass unless overridden."""
    new = parse_kv(args.new_default) if args.new_default else {}
    refine_lr = {"refine_lr": args.refine_lr} if args.refine_lr else {}
    return {  # in the order they run at each ratio: the cheap, shared-calibration rows first
        "svd-llm": dict(SVD_LLM),
        "today": dict(TODAY),
        "+guard": {**TODAY, "speed_guard": "auto"},
        "new": new,
        "r4": {"method": "whiten"},
        "+calib": {**TODAY, "calib": args.calib_mix},
        "+anchor": {**TODAY, "anchor": True, "sequential": True},
        "+refine": {**TODAY, "refine_steps": args.refine_steps, **refine_lr},
        "new+refine": {**new, "method": "whiten", "refine_steps": args.refine_steps, **refine_lr},  # refines factors
        "modegpt": {"method": "modegpt", **parse_kv(args.modegpt)},
        "+healing": {**new, "method": "whiten", "heal_steps": args.heal_steps},  # healing adapts factors: whiten
    }


LABELS = {"svd-llm": "SVD-LLM setting (whiten + uniform)", "today": "today's default (round 2)",
          "+anchor": "today + anchor (+ sequential)", "+refine": "today + block refinement",
          "+calib": "today + calibration mixture", "+guard": "today + speed guard", "new": "new default",
          "new+refine": "round-4 default + block refinement", "modegpt": "MoDeGPT",
          "r4": "round-4 default (whiten + global, ptb+bbc)", "+healing": "round-4 default + healing"}
FULL_RATIO_ROWS = ("svd-llm", "new", "r4")
UNCACHED = ("today", "new")  # at TIME_RATIO these two always run their own calibration pass (their times compare)
TIME_RATIO = 0.2


def known(row: dict) -> list[str]:
    """Keys of ``row`` that CompressConfig lacks (the row is skipped then)."""
    names = {f.name for f in dataclasses.fields(CompressConfig)}
    return [k for k in row if k not in names]


def build_grid(args) -> tuple[list[dict], list[str]]:
    spec = rows_spec(args)
    if args.only:
        spec = {f"only{i}": parse_kv(s) for i, s in enumerate(args.only)}
        LABELS.update({k: f"only: {s}" for k, s in zip(spec, args.only)})
    chosen = list(spec) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    bad = [r for r in chosen if r not in spec]
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {', '.join(spec)}")
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else list(ALL_RATIOS)
    skip = set()
    for item in filter(None, (x.strip() for x in args.skip.split(","))):
        tag, _, ratio = item.partition("@")
        try:
            skip.add((tag, round(float(ratio), 6)))
        except ValueError:
            raise SystemExit(f"--skip takes TAG@RATIO items, got {item!r}") from None
    grid, notes = [], []
    for ratio in ratios:
        for tag in chosen:
            if not (args.all_ratios or args.only or ratio in REDUCED_RATIOS or tag in FULL_RATIO_ROWS):
                continue
            if (tag, round(ratio, 6)) in skip:
                continue
            missing = known(spec[tag])
            if missing:
                note = f"skipped {tag!r}: CompressConfig has no field {', '.join(missing)} (not in the tree yet)"
                if note not in notes:
                    notes.append(note)
                    print(note, file=sys.stderr, flush=True)
                continue
            grid.append({"tag": tag, "config": {**spec[tag], "ratio": ratio}})
    return grid, notes


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="valid", help="valid, test, or valid,test (compress once, evaluate on both)")
    ap.add_argument("--rows", default="all", help="comma list of row tags (default all): " + ", ".join(LABELS))
    ap.add_argument("--ratios", default=None, help="comma list of ratios (default 0.1,...,0.5, reduced grid)")
    ap.add_argument("--all-ratios", action="store_true", help="every row at every ratio (not the reduced grid)")
    ap.add_argument("--only", action="append", help="key=value,... one extra configuration (repeatable)")
    ap.add_argument("--new-default", default="", help="key=value,... the new default if not yet CompressConfig's")
    ap.add_argument("--refine-steps", type=int, default=12, help="refine_steps of the +refine and new+refine rows")
    ap.add_argument("--refine-lr", type=float, default=None,
                    help="refine_lr of the +refine and new+refine rows (default: CompressConfig's)")
    ap.add_argument("--skip", default="", help="comma list of TAG@RATIO rows left out (measured in another run)")
    ap.add_argument("--test-only", default="", help="comma list of row tags evaluated on the test split only")
    ap.add_argument("--dense-from", default=None, metavar="JSON",
                    help="dense perplexities from an earlier run of this script (same model, tokens, seq-len)")
    ap.add_argument("--heal-steps", type=int, default=50, help="heal_steps of the +healing row")
    ap.add_argument("--calib-mix", default="ptb+bbc", help="calib of the +calib row")
    ap.add_argument("--modegpt", default="", help="key=value,... extra fields of the modegpt row (sequential=True)")
    ap.add_argument("--time-goal", action="store_true",
                    help="at ρ = 0.2 today and new default run their own calibration pass (times comparable)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge result files of earlier runs into --out and print the table (no measuring)")
    ap.add_argument("--out", default="compress_quality", help="result name under bench/results (or a .json path)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default); 1 is much faster on a machine shared with other jobs")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    splits = [s.strip() for s in args.split.split(",")]
    if any(s not in ("valid", "test") for s in splits):
        raise SystemExit(f"--split must be valid, test or valid,test, got {args.split!r}")

    if args.merge:
        return merge(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    grid, notes = build_grid(args)
    info = run_info()
    tok = load_tokenizer(args.model)
    base = load_model(args.model)
    texts = {(s, name): load_text(name, s) for s in splits for name in TEXTS}

    test_only = {t.strip() for t in args.test_only.split(",") if t.strip()}
    if test_only and "test" not in splits:
        raise SystemExit("--test-only needs the test split in --split")

    def evaluate(model, only: tuple[str, ...] | None = None) -> dict:
        out: dict = {}
        for (s, name), text in texts.items():
            if only is not None and s not in only:
                continue
            out.setdefault(s, {})[name] = perplexity(model, tok, text, seq_len=args.seq_len, max_tokens=args.tokens,
                                                     name=f"{name}:{s}").perplexity
        return out

    t = time.perf_counter()
    dense = dense_from(args, splits) if args.dense_from else evaluate(base)
    print(f"dense: {dense} ({time.perf_counter() - t:.0f}s{', from ' + args.dense_from if args.dense_from else ''})",
          file=sys.stderr, flush=True)
    caches: dict[tuple, dict] = {}
    rows: list[dict] = []
    data = {"model": args.model, "splits": splits, "notes": notes, "dense": dense, "rows": rows, "run": info,
            "protocol": protocol(args)}
    done: dict[str, dict] = {}
    for i, item in enumerate(grid):
        tag = item["tag"]
        config = CompressConfig(**item["config"], progress=False)
        cfg = config.to_dict()
        ident = json.dumps(cfg, sort_keys=True, default=str)
        if ident in done:
            prev = done[ident]
            rows.append({**prev, "tag": tag, "label": LABELS.get(tag, tag), "same_as": prev["tag"]})
            print(f"[{i + 1}/{len(grid)}] {tag:10s} ρ={config.ratio}: same configuration as {prev['tag']}",
                  file=sys.stderr, flush=True)
            annotate(data)
            save(args.out, data)
            continue
        # refinement reads the cache in its spectra pass only (its factorisation pass walks the data); the cache
        # holds dense statistics, which is what every non-sequential walk collects
        reusable = not cfg["sequential"] and not cfg.get("anchor") and cfg["method"] != "modegpt"
        key = (cfg["method"], cfg["calib"], cfg["skip_first"], cfg["calib_samples"], cfg["seq_len"], cfg["seed"],
               cfg.get("compute_dtype"))
        cache = caches.setdefault(key, {}) if reusable else None
        cached = bool(cache) and not (args.time_goal and tag in UNCACHED and config.ratio == TIME_RATIO)
        model = copy.deepcopy(base)
        load_before = [round(x, 2) for x in os.getloadavg()]
        cpu0 = time.process_time()
        res = compress(model, config, tokenizer=tok, stats_cache=cache if (cached or not cache) else None)
        cpu_s = time.process_time() - cpu0
        t = time.perf_counter()
        ppl = evaluate(model, ("test",) if tag in test_only else None)
        guard = (getattr(model, "rankwise_meta", {}) or {}).get("allocation_info", {})
        row = {
            "tag": tag, "label": LABELS.get(tag, tag), "ratio": config.ratio,
            "config": {k: v for k, v in cfg.items() if k not in ("progress",)},
            "method": res.method, "method_choice": res.method_choice,
            "achieved_ratio": res.achieved_ratio, "ppl": ppl, "compress_s": res.seconds, "compress_cpu_s": cpu_s,
            "cached": cached,
            "timings": res.timings, "eval_s": time.perf_counter() - t, "dense_matrices": len(res.dense),
            "slower_than_dense": guard.get("slower_than_dense"), "load_avg": load_before,
            "heal_steps": cfg.get("heal_steps", 0),
        }
        rows.append(row)
        done[ident] = row
        print(f"[{i + 1}/{len(grid)}] {tag:10s} ρ={config.ratio} → " + "  ".join(
            f"{s}: PTB {ppl[s]['ptb']:.1f} BBC {ppl[s]['bbc']:.1f}" for s in ppl)
            + f" ({res.seconds:.0f}s{' cached' if cached else ''} + {row['eval_s']:.0f}s)", file=sys.stderr, flush=True)
        del model
        gc.collect()
        annotate(data)
        save(args.out, data)
    table(data)
    return 0


def dense_from(args, splits: list[str]) -> dict:
    """Dense perplexities of ``splits`` from an earlier result file, refused unless its protocol matches."""
    prev = json.loads(Path(args.dense_from).read_text())
    def plain(text: str) -> str:  # the protocol without the list of splits
        return re.sub(r" \([^)]*split\)", "", text)

    want = plain(protocol(args)["eval"])
    have = plain((prev.get("protocol") or {}).get("eval", ""))
    if prev.get("model") != args.model or have != want:
        raise SystemExit(f"--dense-from {args.dense_from}: model/protocol {prev.get('model')!r}/{have!r} differ from "
                         f"{args.model!r}/{want!r}")
    missing = [s for s in splits if s not in prev.get("dense", {})]
    if missing:
        raise SystemExit(f"--dense-from {args.dense_from} has no dense perplexity on the {', '.join(missing)} split")
    return {s: prev["dense"][s] for s in splits}


def protocol(args) -> dict:
    return {"eval": f"first {args.tokens} tokens of ptb and bbc ({', '.join(args.split.split(','))} split), "
                    f"{args.seq_len}-token windows, BOS prepended",
            "calibration": "train split of the row's calib (default: CompressConfig's, "
                           f"{CompressConfig.calib}), 32 windows x 256 tokens, seed 0",
            "grid": "reduced: every row at rho 0.2 and 0.4; svd-llm and new default also at 0.1, 0.3, 0.5"
                    if not args.all_ratios else "every row at every ratio",
            "goals": {str(k): {"ptb_max_x_dense": v[0], "bbc_max_x_dense": v[1]} for k, v in GOALS.items()},
            "time_goal": f"new default compress_s <= {TIME_GOAL} x today's (uncached rows, same process)"}


def annotate(data: dict) -> None:
    """Degradation factors vs dense, ratios vs the svd-llm row of the same process, goals met or not."""
    dense = data["dense"]
    rows = data["rows"]
    for r in rows:
        r["x_dense"] = {s: {t: r["ppl"][s][t] / dense[s][t] for t in TEXTS} for s in r["ppl"]}
        base = next((b for b in rows if b["tag"] == "svd-llm" and b["ratio"] == r["ratio"]
                     and b.get("process") == r.get("process")), None)
        if base is not None:
            r["x_svd_llm"] = {s: {t: r["ppl"][s][t] / base["ppl"][s][t] for t in TEXTS}
                              for s in r["ppl"] if s in base["ppl"]}
        goal = GOALS.get(round(r["ratio"], 6))
        if goal is not None and not r.get("heal_steps"):
            r["goal"] = {s: {"ptb": r["x_dense"][s]["ptb"] <= goal[0], "bbc": r["x_dense"][s]["bbc"] <= goal[1]}
                         for s in r["x_dense"]}
        if r["tag"] == "new":
            today = next((b for b in rows if b["tag"] == "today" and b["ratio"] == r["ratio"]
                          and b.get("process") == r.get("process") and not b["cached"]), None)
            if today is not None and not r["cached"]:
                r["time_x_today"] = r["compress_s"] / today["compress_s"]
                if r.get("compress_cpu_s") and today.get("compress_cpu_s"):
                    r["cpu_time_x_today"] = r["compress_cpu_s"] / today["compress_cpu_s"]
                r["time_goal_met"] = r.get("cpu_time_x_today", r["time_x_today"]) <= TIME_GOAL


def save(out: str, data: dict) -> Path:
    if out.endswith(".json"):
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        return path
    return write_result(out, data)


def merge(args) -> int:
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    rows = []
    for i, p in enumerate(parts):
        for r in p["rows"]:
            r = dict(r, process=i)
            r.pop("x_svd_llm", None)
            rows.append(r)
    order = list(LABELS)
    rows.sort(key=lambda r: (r["ratio"], order.index(r["tag"]) if r["tag"] in order else 99, r["process"]))
    splits = sorted({s for p in parts for s in p["splits"]}, key=["valid", "test"].index)
    dense: dict = {}
    for p in parts:
        for s, v in p["dense"].items():
            dense.setdefault(s, v)
    data = {"model": parts[0]["model"], "splits": splits, "dense": dense, "rows": rows,
            "notes": sorted({n for p in parts for n in p.get("notes", [])}),
            "protocol": parts[0].get("protocol"), "merged_from": [str(f) for f in args.merge],
            "parts_run": [p.get("run") for p in parts],
            "merge_note": "rows of several processes; ×svd-llm only against the svd-llm row of the same process"}
    annotate(data)
    save(args.out, data)
    table(data)
    return 0


def table(data: dict) -> None:
    dense = data["dense"]
    for s in data["splits"]:
        have = [r for r in data["rows"] if s in r["ppl"]]
        if not have:
            continue
        print(f"\n### {s} split: perplexity (× dense); dense PTB {dense[s]['ptb']:.2f}, BBC {dense[s]['bbc']:.2f}")
        print("| configuration | ρ | achieved | PTB | × dense | BBC | × dense | goal | compress s | slower layers |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for r in have:
            x = r["x_dense"][s]
            g = r.get("goal", {}).get(s)
            goal = "-" if g is None else ("met" if g["ptb"] and g["bbc"] else
                                          "not met (" + ", ".join(t.upper() for t in TEXTS if not g[t]) + ")")
            if r.get("heal_steps"):
                goal = "apart (trained)"
            secs = f"{r['compress_s']:.0f}{' (cached)' if r['cached'] else ''}"
            if "time_x_today" in r:
                secs += f" ({r.get('cpu_time_x_today', r['time_x_today']):.2f}× today, CPU)"
            if r.get("same_as"):
                secs = f"= {r['same_as']}"
            slow = "-" if r.get("slower_than_dense") is None else str(r["slower_than_dense"])
            print(f"| {r['label']} | {r['ratio']} | {r['achieved_ratio']:.3f} | {r['ppl'][s]['ptb']:.1f} | "
                  f"{x['ptb']:.2f} | {r['ppl'][s]['bbc']:.1f} | {x['bbc']:.2f} | {goal} | {secs} | {slow} |")
    for n in data.get("notes", []):
        print(f"note: {n}")


if __name__ == "__main__":
    raise SystemExit(main())

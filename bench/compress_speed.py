"""Speed of factorised vs dense SmolLM2-135M on this CPU: layers, whole model, break-even report.

    .venv/bin/python bench/compress_speed.py --threads 1 --skip-layers   # the default pipeline at ρ = 0.1 … 0.5
    .venv/bin/python bench/compress_speed.py --allocs uniform --ratios 0.2,0.4   # round 2's plain-SVD table
    .venv/bin/python bench/compress_speed.py --quick    # smoke run

1. Layer timings: dense m×n vs two-matmul rank-k at SmolLM2's shapes, ranks 0.1–1.0 × the parameter
   break-even, token counts 1 (decode), 64, 512 (prefill); the cost model of rankwise.evaluation.speed is
   re-fitted and the measured crossing rank is reported beside the modelled one.
2. Model speed: dense and compressed models measured in ONE process, alternately, prefill of a 512-token
   PTB-test prompt and greedy decode of 64 tokens with the KV cache, median of the repeats (min also
   kept). Compressed by the DEFAULT pipeline (``rankwise.compress`` with CompressConfig's defaults, speed
   guard included; ``--pipeline key=value,...`` overrides fields) at ρ = 0.1 … 0.5 (``--allocs default``);
   ``--allocs uniform`` / ``global`` give round 2's plain-SVD models. ``--guard-off`` also compresses each
   ρ with ``speed_guard="off"`` and reports its slow layers (timed too with ``--time-guard-off``).
3. Per-layer break-even report: every factorised layer's rank beside its parameter break-even rank and its
   speed break-even ranks (prefill, decode); a layer at/above the parameter break-even is a bug.

Writes bench/results/compress_speed.json and prints tables. The machine load (os.getloadavg) is recorded
before and after each stage: on a shared machine timings are only as good as the quiet they got.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rankwise import find_targets, load_model, load_text, load_tokenizer
from rankwise.engine.metrics import break_even_rank
from rankwise.evaluation.report import size_report
from rankwise.evaluation.speed import (
    SMOLLM2_SHAPES,
    fit_cost_model,
    measure_speed,
    prompt_ids,
    speed_break_even_rank,
    time_layers,
)
from rankwise.surgery import LowRankLinear, set_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_kv, run_info, write_result  # noqa: E402

console = Console(stderr=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def layer_bench(token_counts: list[int], fracs: list[float], rounds: int, clock: str) -> dict:
    """Dense vs factorised time per shape, rank and token count; fitted cost model per token count."""
    out: dict = {"fractions_of_break_even": fracs, "clock": clock, "by_tokens": {}}
    for t in token_counts:
        samples, rows = [], []
        for m, n in SMOLLM2_SHAPES:
            be = break_even_rank(m, n)
            ranks = sorted({max(1, int(f * be)) for f in fracs})
            dense, fact = time_layers(m, n, ranks, tokens=t, rounds=rounds, target_s=0.004, clock=clock)
            samples.append((m, n, None, dense))
            samples += [(m, n, k, s) for k, s in fact.items()]
            ok = [k for k, s in fact.items() if s <= dense]
            rows.append({"shape": [m, n], "break_even": be, "dense_us": dense * 1e6,
                         "factorised_us": {str(k): s * 1e6 for k, s in fact.items()},
                         "speedup": {str(k): dense / s for k, s in fact.items()},
                         "measured_crossing": max(ok) if ok else 0})
        cm = fit_cost_model(samples, t)
        for r in rows:
            r["modelled_crossing"] = min(math.floor(cm.break_even(*r["shape"])), r["break_even"] - 1)
        out["by_tokens"][str(t)] = {"cost_model": cm.to_dict(), "shapes": rows, "load": load()}
        console.print(f"layers @ {t} tokens: fitted {cm}")
    return out


_SVD_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def compress_copy(dense: torch.nn.Module, ratio: float, alloc: str) -> tuple[torch.nn.Module, dict]:
    """A plain-SVD compressed copy of ``dense`` at ``ratio`` (round 2's speed table).

    ``uniform``: plain SVD, every matrix keeps ⌊(1−ρ)·mn/(m+n)⌋ singular values (one exact SVD per
    matrix, shared by all ratios). Other names: ``rankwise.compress(method="svd", alloc=...)``.
    """
    model = copy.deepcopy(dense)
    t0 = time.time()
    if alloc == "uniform":
        for t in find_targets(model):
            m, n = t.shape
            if t.name not in _SVD_CACHE:
                _SVD_CACHE[t.name] = torch.linalg.svd(t.weight().float(), full_matrices=False)
            u, sv, vh = _SVD_CACHE[t.name]
            k = math.floor((1 - ratio) * m * n / (m + n))
            root = sv[:k].sqrt()
            set_module(model, t.name, LowRankLinear.from_factors(u[:, :k] * root, root[:, None] * vh[:k], t.bias))
        fact = [mod for mod in model.modules() if isinstance(mod, LowRankLinear)]
        kept = sum(mod.num_params for mod in fact) / sum(mod.in_features * mod.out_features for mod in fact)
        info = {"via": "exact SVD, uniform rank floor((1-ratio)mn/(m+n))", "achieved_ratio": 1 - kept}
    elif alloc == "auto":  # the whole default pipeline (method="auto": MoDeGPT on SmolLM2), one run per ratio
        from rankwise.compression.api import CompressConfig, compress

        res = compress(model, CompressConfig(ratio=ratio, progress=False))
        info = {"via": "rankwise.compress(CompressConfig(ratio=ratio)) (the default pipeline)",
                "achieved_ratio": res.achieved_ratio, "method": res.method, "method_choice": res.method_choice}
    else:
        from rankwise.compression.api import CompressConfig, compress

        res = compress(model, CompressConfig(ratio=ratio, method="svd", alloc=alloc, sequential=False,
                                             speed_guard="off", progress=False))
        info = {"via": f"rankwise.compress(method='svd', alloc={alloc!r})", "achieved_ratio": res.achieved_ratio,
                "dense_kept": res.dense}
    info["seconds"] = round(time.time() - t0, 1)
    return model.eval(), info


class _Captured(Exception):
    """Stops a compress run right after its inputs to the allocator were recorded."""


def default_allocation_inputs(dense: torch.nn.Module, tok, pipeline: dict) -> dict:
    """What the default pipeline hands its allocator (spectra, loss sensitivity, options), from one run.

    ``rankwise.compress`` runs its calibration, loss-sensitivity and spectra passes on a copy of
    ``dense`` and stops at the allocation; every ratio's ranks then come from the same inputs
    (those passes do not depend on the ratio). Speed depends only on the ranks, so the models
    timed here carry plain-SVD factors of exactly those ranks (compress_quality.py measures the
    quality of the real factors).
    """
    from unittest import mock

    from rankwise.compression import api

    captured: dict = {}

    def capture(name, shapes, ratio, energies=None, **kw):
        captured.update(name=name, shapes=list(shapes), energies=energies, options=kw)
        raise _Captured

    model = copy.deepcopy(dense)
    # the whiten pipeline (method="auto" would run MoDeGPT on SmolLM2, which has no allocator to intercept)
    config = api.CompressConfig(**{"method": "whiten", **pipeline, "ratio": 0.2, "progress": False})
    t0 = time.time()
    with mock.patch.object(api, "guarded_allocate", capture):
        try:
            api.compress(model, config, tokenizer=tok)
        except _Captured:
            pass
    if not captured:
        raise RuntimeError("the default pipeline did not reach its allocator")
    captured["names"] = [t.name for t in find_targets(dense, config.targets, config.exclude)]
    captured["config"] = config.to_dict()
    captured["seconds"] = round(time.time() - t0, 1)
    del model
    gc.collect()
    return captured


def default_copy(dense: torch.nn.Module, ratio: float, inputs: dict, guard: str | None = None
                 ) -> tuple[torch.nn.Module, dict]:
    """A copy of ``dense`` factorised (plain SVD) at the default pipeline's ranks for ``ratio``."""
    from rankwise.compression.allocation.speed import guarded_allocate

    opts = dict(inputs["options"])
    if guard is not None:
        opts["guard"] = guard
    alloc = guarded_allocate(inputs["name"], inputs["shapes"], ratio, inputs["energies"], **opts)
    model = copy.deepcopy(dense)
    targets = {t.name: t for t in find_targets(model)}
    for name, k in zip(inputs["names"], alloc.ranks):
        if k is None:
            continue
        t = targets[name]
        if name not in _SVD_CACHE:
            _SVD_CACHE[name] = torch.linalg.svd(t.weight().float(), full_matrices=False)
        u, sv, vh = _SVD_CACHE[name]
        root = sv[:k].sqrt()
        set_module(model, name, LowRankLinear.from_factors(u[:, :k] * root, root[:, None] * vh[:k], t.bias))
    info = {"via": "ranks of the default pipeline's allocation (rankwise.compress's own sensitivity and whitened "
                   "spectra), plain-SVD factors of those ranks",
            "achieved_ratio": alloc.achieved_ratio, "dense_kept": sum(k is None for k in alloc.ranks),
            "ranks": dict(zip(inputs["names"], alloc.ranks)),
            "allocation_info": {k: v for k, v in alloc.info.items() if isinstance(v, (int, float, str))}}
    return model.eval(), info


def dropped_loss(inputs: dict, ranks: list[int | None]) -> float:
    """The default allocator's objective for a rank map: Σ_j w_j Σ_{i ≥ k_j} σ_ij² (dense matrices drop nothing).

    w_j is the loss sensitivity (1 without), σ² the whitened spectrum: the loss-weighted output
    error the allocation predicts (its own ``alloc_norm``, here the default ``none``).
    """
    sens = inputs["options"].get("sensitivity") or [1.0] * len(ranks)
    total = 0.0
    for e, w, k in zip(inputs["energies"], sens, ranks):
        if k is not None:
            total += float(w) * float(e.double().clamp_min(0)[k:].sum())
    return total


def proxy_only(args, dense, tok, ratios: list[float], pipeline: dict) -> int:
    """Without timing: the guard's effect on the default allocation (dense matrices, predicted loss)."""
    from rankwise.compression.allocation.speed import guarded_allocate

    inputs = default_allocation_inputs(dense, tok, pipeline)
    rows = []
    for r in ratios:
        row: dict = {"ratio": r}
        for guard in ("auto", "off"):
            opts = {**inputs["options"], "guard": guard}
            a = guarded_allocate(inputs["name"], inputs["shapes"], r, inputs["energies"], **opts)
            row[guard] = {"achieved_ratio": a.achieved_ratio, "dense_kept": sum(k is None for k in a.ranks),
                          "slower_than_dense": a.info["slower_than_dense"],
                          "dropped_loss": dropped_loss(inputs, a.ranks)}
        row["dropped_loss_guard_over_off"] = row["auto"]["dropped_loss"] / row["off"]["dropped_loss"]
        rows.append(row)
        console.print(f"ρ={r}: guard {row['auto']} | off {row['off']} | loss ×{row['dropped_loss_guard_over_off']:.3f}")
    path = write_result(args.out, {"what": dropped_loss.__doc__.splitlines()[0], "config": inputs["config"],
                                   "passes_seconds": inputs["seconds"], "rows": rows})
    console.print(f"wrote {path}")
    return 0


def layer_report(model: torch.nn.Module) -> list[dict]:
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            m, n = mod.out_features, mod.in_features
            be = break_even_rank(m, n)
            rows.append({"name": name, "shape": [m, n], "rank": mod.rank, "break_even": be,
                         "speed_break_even_prefill": speed_break_even_rank(m, n, tokens=512),
                         "speed_break_even_decode": speed_break_even_rank(m, n, tokens=1),
                         "above_break_even": mod.rank >= be})
    return rows


def _best_time(calls: list, x: list[torch.Tensor], rounds: int, target_s: float = 0.004) -> list[float]:
    """Per-call seconds of each ``calls[i](x[i])``: best of ``rounds`` interleaved rounds of enough calls."""
    with torch.no_grad():
        reps = []
        for f, xi in zip(calls, x):
            f(xi)
            t = time.perf_counter()
            f(xi)
            reps.append(max(1, int(target_s / max(time.perf_counter() - t, 1e-7))))
        best = [math.inf] * len(calls)
        for _ in range(rounds):
            for i, (f, xi) in enumerate(zip(calls, x)):
                t = time.perf_counter()
                for _ in range(reps[i]):
                    f(xi)
                best[i] = min(best[i], (time.perf_counter() - t) / reps[i])
    return best


def select_layer_report(model: torch.nn.Module, rounds: int) -> list[dict]:
    """Every MoDeGPT ``SelectLinear`` timed against a dense layer of the shape it replaced, at 1 and 512 tokens.

    Measured, not modelled: the cost model of :mod:`rankwise.evaluation.speed` describes two matmuls, not a
    smaller matmul plus a gather/scatter. Layers with the same geometry are timed once.
    """
    from rankwise.surgery.select import SelectLinear

    rows, done = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, SelectLinear):
            continue
        n_in = mod.in_features if (mod.gather_in or mod.in_index is None) else mod.weight.shape[1]
        key = (mod.in_features, mod.out_features, tuple(mod.weight.shape), mod.scatter_out, mod.gather_in, n_in)
        if key not in done:
            dense = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None).eval()
            res = {}
            for t in (1, 512):
                d_s, s_s = _best_time([dense, mod], [torch.randn(1, t, mod.in_features), torch.randn(1, t, n_in)],
                                      rounds)
                res[t] = {"dense_us": d_s * 1e6, "select_us": s_s * 1e6, "slower": s_s > d_s}
            done[key] = res
        res = done[key]
        rows.append({"name": name, "shape": [mod.out_features, mod.in_features], "kept": list(mod.weight.shape),
                     **{f"{k}_{t}": v for t, r in res.items() for k, v in r.items()}})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--allocs", default="default",
                    help="default (round 4's whiten pipeline, allocation inputs shared across ratios), auto (the whole "
                         "default pipeline per ratio: MoDeGPT on SmolLM2) and/or uniform, global, welore (plain SVD, "
                         "no guard)")
    ap.add_argument("--pipeline", default="", help="key=value,... CompressConfig overrides of the default pipeline")
    ap.add_argument("--guard-off", action="store_true",
                    help="also compress each ratio with speed_guard=off and report its slow layers")
    ap.add_argument("--time-guard-off", action="store_true", help="and time those models too")
    ap.add_argument("--proxy-only", action="store_true",
                    help="no timing: the guard's effect on the default allocation (dense matrices, predicted loss)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layer-rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    ap.add_argument("--out", default="compress_speed", help="result name under bench/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.prompt_tokens, args.new_tokens, args.layer_rounds = 2, 64, 8, 3
    ratios = [float(r) for r in args.ratios.split(",")]
    allocs = args.allocs.split(",")
    result: dict = {
        "run": run_info(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "platform": platform.platform(), "load_start": load()},
    }
    t_all = time.time()
    if not args.skip_layers:
        with console.status("layer timings …"):
            clock = "cpu" if torch.get_num_threads() == 1 else "wall"
            result["layers"] = layer_bench([1, 64, 512], [0.1, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                                           args.layer_rounds, clock)

    dense = load_model("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    if args.proxy_only:
        return proxy_only(args, dense, tok, ratios, parse_kv(args.pipeline))
    models = {"dense": dense}
    info: dict = {}
    pipeline = parse_kv(args.pipeline)
    untimed: dict = {}
    inputs = None
    if "default" in allocs:
        with console.status("default pipeline: calibration, sensitivity and spectra …"):
            inputs = default_allocation_inputs(dense, tok, pipeline)
        result["default_pipeline"] = {"config": inputs["config"], "passes_seconds": inputs["seconds"]}
        console.print(f"default pipeline inputs in {inputs['seconds']} s")
    for alloc in allocs:
        for r in ratios:
            key = f"{alloc}@{r}"
            with console.status(f"compressing {key} …"):
                if alloc == "default":
                    models[key], info[key] = default_copy(dense, r, inputs)
                else:
                    models[key], info[key] = compress_copy(dense, r, alloc)
            console.print(f"compressed {key}: achieved {info[key]['achieved_ratio']:.4f}")
            if alloc == "default" and args.guard_off:
                key_off = f"default-guard-off@{r}"
                with console.status(f"compressing {key_off} …"):
                    m_off, info[key_off] = default_copy(dense, r, inputs, guard="off")
                console.print(f"compressed {key_off}: achieved {info[key_off]['achieved_ratio']:.4f}")
                if args.time_guard_off:
                    models[key_off] = m_off
                else:
                    rep_off = layer_report(m_off)
                    untimed[key_off] = {
                        "compression": info[key_off], "layers": rep_off,
                        "layers_above_speed_break_even_prefill": sum(x["rank"] > x["speed_break_even_prefill"]
                                                                     for x in rep_off),
                        "layers_above_speed_break_even_decode": sum(x["rank"] > x["speed_break_even_decode"]
                                                                    for x in rep_off)}
                    del m_off
                    gc.collect()
    _SVD_CACHE.clear()
    ids = prompt_ids(tok, load_text("ptb", "test"), args.prompt_tokens, name="ptb test")
    result["load_before_speed"] = load()
    speed = measure_speed(models, ids, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                          progress=True)
    result["load_after_speed"] = load()
    d = speed["dense"]
    rows = {}
    for key, s in speed.items():
        rep = layer_report(models[key])
        sel = select_layer_report(models[key], args.layer_rounds) if key != "dense" else []
        sz = size_report(models[key])
        rows[key] = {
            "compression": info.get(key),
            "params": sz.params,
            "factorised_layers": sz.factorised_layers,
            "prefill_tokens_per_s": s.prefill_tokens_per_s,
            "prefill_tokens_per_s_best": s.prompt_tokens / min(s.prefill_s),
            "decode_tokens_per_s": s.decode_tokens_per_s,
            "decode_tokens_per_s_best": (args.new_tokens - 1) / min(s.decode_s),
            "prefill_speedup": s.prefill_tokens_per_s / d.prefill_tokens_per_s,
            "prefill_speedup_best": min(d.prefill_s) / min(s.prefill_s),
            "decode_speedup": s.decode_tokens_per_s / d.decode_tokens_per_s,
            "prefill_speedup_cpu": statistics.median(d.prefill_cpu_s) / statistics.median(s.prefill_cpu_s),
            "decode_speedup_cpu": statistics.median(d.decode_cpu_s) / statistics.median(s.decode_cpu_s),
            "prefill_tokens_per_cpu_s": s.prompt_tokens / statistics.median(s.prefill_cpu_s),
            "decode_tokens_per_cpu_s": (args.new_tokens - 1) / statistics.median(s.decode_cpu_s),
            "paired_prefill_speedup_median": statistics.median(a / b for a, b in zip(d.prefill_s, s.prefill_s)),
            "peak_rss_mb": s.peak_memory_mb,
            "same_greedy_tokens_as_dense": s.generated == d.generated,
            "speed": s.to_dict(),
            "layers": rep,
            "layers_above_break_even": sum(r["above_break_even"] for r in rep),
            "layers_above_speed_break_even_prefill": sum(r["rank"] > r["speed_break_even_prefill"] for r in rep),
            "layers_above_speed_break_even_decode": sum(r["rank"] > r["speed_break_even_decode"] for r in rep),
            "select_layers": sel,
            "select_layers_slower_prefill": sum(r["slower_512"] for r in sel),
            "select_layers_slower_decode": sum(r["slower_1"] for r in sel),
        }
    result["models"] = rows
    result["untimed"] = untimed
    result["settings"] = {"prompt_tokens": int(ids.shape[1]), "prompt_text": "ptb test", "new_tokens": args.new_tokens,
                          "repeats": args.repeats, "warmup": args.warmup, "statistic": "median (best also given)",
                          "prefill": "one forward, KV cache built, logits of the last position only"}
    timed = [k for k in rows if k != "dense"]
    slow = {k: rows[k]["layers_above_speed_break_even_prefill"] + rows[k]["layers_above_speed_break_even_decode"]
            + rows[k]["select_layers_slower_prefill"] + rows[k]["select_layers_slower_decode"] for k in timed}
    result["goal_no_layer_slower_than_dense"] = {"slow_layers_prefill_plus_decode": slow,
                                                 "met": all(v == 0 for k, v in slow.items()
                                                            if not k.startswith(("uniform", "global", "welore")))}
    result["goal_never_slower_than_dense_model"] = {
        k: {"prefill_cpu": rows[k]["prefill_speedup_cpu"] >= 1.0, "decode_cpu": rows[k]["decode_speedup_cpu"] >= 1.0}
        for k in timed}
    result["seconds"] = round(time.time() - t_all, 1)
    result["machine"]["load_end"] = load()

    path = write_result(args.out, result)
    print_tables(result)
    console.print(f"wrote {path}")
    return 0


def print_tables(result: dict) -> None:
    if "layers" in result:
        t = Table(title="layer: dense time / factorised time (>1 = factorised faster), rank as fraction of break-even")
        t.add_column("tokens")
        t.add_column("shape")
        fr = result["layers"]["fractions_of_break_even"]
        for f in fr:
            t.add_column(f"{f:.2f}", justify="right")
        t.add_column("crossing meas/model", justify="right")
        for tk, blk in result["layers"]["by_tokens"].items():
            for r in blk["shapes"]:
                t.add_row(tk, "×".join(map(str, r["shape"])), *[f"{v:.2f}" for v in r["speedup"].values()],
                          f"{r['measured_crossing']}/{r['modelled_crossing']} of {r['break_even']}")
        Console().print(t)
    t = Table(title="SmolLM2-135M speed, one process, alternating runs (median)")
    for c in ("model", "achieved ρ", "params", "prefill tok/s", "×dense", "×dense cpu", "decode tok/s", "×dense",
              "×dense cpu", "above be", "above speed-be prefill/decode", "same tokens"):
        t.add_column(c, justify="right")
    for key, r in result["models"].items():
        ach = (r.get("compression") or {}).get("achieved_ratio")
        t.add_row(key, "-" if ach is None else f"{ach:.3f}", f"{r['params'] / 1e6:.1f}M",
                  f"{r['prefill_tokens_per_s']:.1f}", f"{r['prefill_speedup']:.2f}",
                  f"{r['prefill_speedup_cpu']:.2f}", f"{r['decode_tokens_per_s']:.2f}", f"{r['decode_speedup']:.2f}",
                  f"{r['decode_speedup_cpu']:.2f}",
                  str(r["layers_above_break_even"]),
                  f"{r['layers_above_speed_break_even_prefill']}/{r['layers_above_speed_break_even_decode']}",
                  str(r["same_greedy_tokens_as_dense"]))
    Console().print(t)
    for key, r in result.get("untimed", {}).items():
        Console().print(f"{key} (not timed): achieved ρ {r['compression']['achieved_ratio']:.3f}, layers slower than "
                        f"dense prefill/decode {r['layers_above_speed_break_even_prefill']}/"
                        f"{r['layers_above_speed_break_even_decode']}")


if __name__ == "__main__":
    raise SystemExit(main())

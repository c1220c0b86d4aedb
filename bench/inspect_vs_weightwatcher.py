"""Benchmark: ``rankwise inspect`` against WeightWatcher and against bare ``svdvals``, on SmolLM2-135M.

All measured in one process on the same loaded model and the same 210 target
matrices (every Linear except the tied LM head):

* bare ``torch.linalg.svdvals``, batched by shape (the physical limit of any
  SVD-based tool) and one call per matrix;
* ``rankwise.inspect`` (all metrics, power-law fits, WeLore classes), with the
  model already loaded;
* ``weightwatcher.WeightWatcher(model).analyze(layers=<the same 210>)`` with
  its defaults (power-law fit, no plots).

Then per-matrix agreement of α and of the stable rank between rankwise and
WeightWatcher. Writes ``bench/results/inspect_vs_weightwatcher.json`` and prints
a table. Run: ``.venv/bin/python bench/inspect_vs_weightwatcher.py`` (needs the
``bench`` extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from rankwise.engine.threads import torch_threads
from rankwise.inspection.api import InspectConfig, inspect
from rankwise.io.models import load_model
from rankwise.surgery import find_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402


def bare_svdvals_batched(weights: list[torch.Tensor]) -> float:
    """Seconds for svdvals of every matrix, stacked by shape (float32), like engine.svd.spectra."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    for w in weights:
        groups[tuple(w.shape)].append(w)
    t0 = time.perf_counter()
    for mats in groups.values():
        torch.linalg.svdvals(torch.stack(mats).float())
    return time.perf_counter() - t0


def bare_svdvals_loop(weights: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for w in weights:
        torch.linalg.svdvals(w.float())
    return time.perf_counter() - t0


def _blas_threads(n: int | None):
    """Limit numpy/scipy BLAS threads (WeightWatcher's SVD runs in scipy) to ``n`` when threadpoolctl is there."""
    import contextlib

    if not n:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n)


def run_weightwatcher(
    model: torch.nn.Module, names: list[str], threads: int | None
) -> tuple[float, dict[str, dict[str, float]]]:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = ww.WeightWatcher(model=model)
    desc = watcher.describe()
    wanted = set(names)
    ids = [int(i) for i, n in zip(desc["layer_id"], desc["longname"]) if n in wanted]
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _blas_threads(threads), torch_threads(threads):
        warnings.simplefilter("ignore")
        details = watcher.analyze(layers=ids)
    elapsed = time.perf_counter() - t0
    out = {}
    for _, row in details.iterrows():
        out[row["longname"]] = {
            "alpha": float(row["alpha"]),
            "stable_rank": float(row["stable_rank"]),
            "xmin": float(row["xmin"]),
            "D": float(row["D"]),
        }
    return elapsed, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch (and, for WeightWatcher, BLAS) threads of every run (1; 0 = library defaults)")
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats of the fast runs (min is reported)")
    ap.add_argument("--ww-default-threads", action="store_true",
                    help="also time WeightWatcher with its library-default threads (what a plain `analyze()` gets)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the one-svdvals-per-matrix timing")
    args = ap.parse_args()

    model = load_model(args.model)
    targets = find_targets(model)
    names = [t.name for t in targets]
    weights = [t.weight().contiguous() for t in targets]
    print(f"{len(names)} target matrices of {args.model}; torch {torch.__version__}, threads={args.threads}",
          file=sys.stderr)

    with torch_threads(args.threads):
        svd_batched = min(bare_svdvals_batched(weights) for _ in range(args.repeats))
        svd_loop = None if args.skip_loop else bare_svdvals_loop(weights)
    cfg = InspectConfig(progress=False, threads=args.threads)
    rw_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        report = inspect(model, cfg)
        rw_times.append(time.perf_counter() - t0)
    rw_time = min(rw_times)
    cfg_svd = InspectConfig(progress=False, threads=args.threads, spectrum_method="svd")
    t0 = time.perf_counter()
    report_svd = inspect(model, cfg_svd)
    rw_svd_time = time.perf_counter() - t0
    from rankwise.io.models import resolve_model

    folder = resolve_model(args.model)  # streamed from its safetensors: read included, model never built
    t0 = time.perf_counter()
    report_stream = inspect(folder, InspectConfig(progress=False, threads=args.threads, stream=True))
    rw_stream_time = time.perf_counter() - t0
    stream_same = [r["name"] for r in report_stream.matrices] == [r["name"] for r in report.matrices] and all(
        math.isclose(a["stable_rank"], b["stable_rank"], rel_tol=1e-9)
        for a, b in zip(report_stream.matrices, report.matrices))

    ww_time, ww_rows = run_weightwatcher(model, names, args.threads)
    ww_default_time = run_weightwatcher(model, names, None)[0] if args.ww_default_threads else None

    d_alpha, d_alpha_svd, sr_rel, both = [], [], [], 0
    per_matrix = []
    for row in report.matrices:
        w = ww_rows.get(row["name"])
        if w is None:
            continue
        sr = abs(row["stable_rank"] - w["stable_rank"]) / w["stable_rank"]
        sr_rel.append(sr)
        a, b = row["alpha"], w["alpha"]
        entry = {"name": row["name"], "alpha_rankwise": a, "alpha_ww": b, "stable_rank_rankwise": row["stable_rank"],
                 "stable_rank_ww": w["stable_rank"], "xmin_rankwise": row["alpha_xmin"], "xmin_ww": w["xmin"]}
        if a is not None and math.isfinite(a) and math.isfinite(b):
            both += 1
            d_alpha.append(abs(a - b))
            a2 = report_svd[row["name"]]["alpha"]
            d_alpha_svd.append(abs(a2 - b))
        per_matrix.append(entry)

    result = {
        "model": args.model,
        "matrices": len(names),
        "matched_with_ww": len(per_matrix),
        "both_fit": both,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0]},
        "seconds": {
            "bare_svdvals_batched": svd_batched,
            "bare_svdvals_loop": svd_loop,
            "rankwise_inspect": rw_time,
            "rankwise_inspect_svd": rw_svd_time,
            "rankwise_inspect_streamed_from_folder": rw_stream_time,
            "weightwatcher_analyze": ww_time,
            "weightwatcher_analyze_default_threads": ww_default_time,
        },
        "ratios": {
            "rankwise_over_svdvals_batched": rw_time / svd_batched,
            "weightwatcher_over_rankwise": ww_time / rw_time,
            "weightwatcher_default_threads_over_rankwise": (
                None if ww_default_time is None else ww_default_time / rw_time
            ),
        },
        "agreement": {
            "median_abs_delta_alpha": statistics.median(d_alpha) if d_alpha else None,
            "mean_abs_delta_alpha": float(np.mean(d_alpha)) if d_alpha else None,
            "max_abs_delta_alpha": max(d_alpha) if d_alpha else None,
            "frac_alpha_within_0.05": float(np.mean(np.array(d_alpha) <= 0.05)) if d_alpha else None,
            "median_abs_delta_alpha_svd_spectrum": statistics.median(d_alpha_svd) if d_alpha_svd else None,
            "max_rel_delta_stable_rank": max(sr_rel) if sr_rel else None,
            "frac_stable_rank_within_1e-4": float(np.mean(np.array(sr_rel) <= 1e-4)) if sr_rel else None,
        },
        "streamed_equals_in_memory": stream_same,
        "goals": {},
        "per_matrix": per_matrix,
    }
    g = result["goals"]
    g["rankwise_5x_faster_than_ww"] = ww_time >= 5 * rw_time
    g["rankwise_within_1.5x_svdvals"] = rw_time <= 1.5 * svd_batched
    g["median_abs_delta_alpha_le_0.05"] = bool(d_alpha) and statistics.median(d_alpha) <= 0.05
    g["stable_rank_equal_1e-4"] = bool(sr_rel) and max(sr_rel) <= 1e-4

    out_path = write_result("inspect_vs_weightwatcher", result)

    s, a = result["seconds"], result["agreement"]
    lines = [
        f"| measure ({len(names)} matrices of {args.model}, {args.threads} torch thread(s)) | value |",
        "|---|---|",
        f"| bare svdvals, batched by shape | {s['bare_svdvals_batched']:.2f} s |",
    ]
    if svd_loop is not None:
        lines.append(f"| bare svdvals, one call per matrix | {svd_loop:.2f} s |")
    lines += [
        f"| rankwise inspect (Gram spectra, all metrics) | {rw_time:.2f} s |",
        f"| rankwise inspect --spectrum svd | {rw_svd_time:.2f} s |",
        f"| rankwise inspect FOLDER, streamed (reading included) | {rw_stream_time:.2f} s |",
        f"| WeightWatcher 0.7.7 analyze (same matrices) | {ww_time:.2f} s |",
        *([f"| WeightWatcher analyze, library-default threads | {ww_default_time:.2f} s |"]
          if ww_default_time is not None else []),
        f"| rankwise / bare svdvals (goal ≤ 1.5) | {result['ratios']['rankwise_over_svdvals_batched']:.2f} |",
        f"| WeightWatcher / rankwise, equal threads (goal ≥ 5) | {ww_time / rw_time:.1f} |",
        *([f"| WeightWatcher (default threads) / rankwise (default) | {ww_default_time / rw_time:.1f} |"]
          if ww_default_time is not None else []),
        f"| median abs Δα over {both} matrices both fit (goal ≤ 0.05) | {a['median_abs_delta_alpha']:.2e} |",
        f"| max abs Δα | {a['max_abs_delta_alpha']:.2e} |",
        f"| max relative Δ stable rank (goal ≤ 1e-4) | {a['max_rel_delta_stable_rank']:.2e} |",
    ]
    print("\n".join(lines))
    print(f"goals: {json.dumps(g)}")
    print(f"wrote {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

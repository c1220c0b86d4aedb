"""Benchmark: optimizer-state memory, speed and quality of low-rank optimisers (issue 6).

SmolLM2-135M *architecture* trained from scratch (seeded init) on PTB train, the same
seed and the same batches for every run, side by side in one process:

* ``adamw``         torch.optim.AdamW (eps 1e-6, as galore-torch)
* ``galore-torch``  galore_torch.GaLoreAdamW (the peer, exact SVD)
* ``rw-svd``        rankwise GaLoreAdamW, exact SVD projection
* ``rw-randomized`` rankwise, seeded randomized range finder
* ``rw-dct``        rankwise, SVD-free DCT projection (only indices stored)
* ``rw-fira``       rankwise, SVD projection + Fira residual

all GaLore variants at rank 128, scale 0.25, the same update gap, the same
parameter groups (attention/MLP matrices projected; embedding, norms plain).
Second table: AdamW with the TRP and Cuttlefish callbacks on the same run.

Training regimes (issue 13), AdamW on the regime's trainable parameters, same data and steps:

* ``sltrain``       every attention/MLP matrix W = s·B A + S, S on a fixed random support (density δ)
* ``relora``        W frozen + LoRA merged every ``--relora-every`` steps, partial optimizer reset, jagged cosine
* ``lost``          SVD split: top-r low-rank part + channel-sparse part from the rest of the spectrum
* ``sltrain@LR``    (any row may carry ``@LR``, e.g. ``adamw@3e-4``, ``rw-svd@3e-3``) the same at another
                    learning rate (SLTrain's paper: 3e-3)

GaLore against a *tuned* AdamW (issue 13): run ``adamw@LR`` and ``rw-*@LR`` rows at several learning
rates with ``--valid-tokens N``; each family's best learning rate is chosen on PTB *valid* loss and the
fourth table compares every row with the tuned AdamW: final train loss, valid loss, mean loss on the
last three 10-step windows (the ranking per window tells whether the order is stable), and the paired
per-step difference to the tuned AdamW over the last 20 steps (mean, standard error; every row sees
the same batches). ``goals["galore_within_5pct_of_tuned_adamw"]`` holds the verdict.

Third table (regimes): parameters (whole model and targeted matrices, also the closed form at the
full 30-layer depth), trainable parameters, optimizer state, peak RSS, tokens/s, final loss and its
ratio to AdamW's. ``--layers N`` trains a shallower SmolLM2 (same width, vocabulary and blocks) so the
rows fit the shared CPU; every row of one run uses the same depth, steps and batches.

Columns: optimizer-state bytes (resident, counted from the state tensors,
projections included) for the whole model and for the projected matrices
only, peak RSS during the run, median time per step, time per projection
refresh (all matrices at one refresh step), final train loss (mean of the last
5 steps), PTB-test perplexity.

    .venv/bin/python bench/train_memory.py            # writes bench/results/train_memory.json
    .venv/bin/python bench/train_memory.py --only adamw,rw-svd,sltrain,relora,lost --layers 4 --steps 40 \
        --out bench/results/train_regimes.json
    .venv/bin/python bench/train_memory.py --only adamw@1e-4,adamw@3e-4,adamw,rw-svd,rw-svd@3e-3 --layers 4 \
        --steps 60 --batch-size 2 --seq-len 64 --valid-tokens 2048 --out bench/results/train_tuned_lr.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import run_info  # bench/_common.py
from _peers import galore_torch_adamw  # bench/_peers.py (run as python bench/train_memory.py)
from rankwise.evaluation.memory import PeakMemory
from rankwise.evaluation.perplexity import perplexity
from rankwise.io.atomic import atomic_file
from rankwise.io.models import load_tokenizer, resolve_model
from rankwise.io.texts import load_text
from rankwise.train import TRP, Cuttlefish, GaLoreAdamW, galore_param_groups, optimizer_state_bytes
from rankwise.train.config import TrainRunConfig, build_regime

OPTIMIZERS = ["adamw", "galore-torch", "rw-svd", "rw-randomized", "rw-dct", "rw-fira"]
CALLBACKS = ["adamw+trp", "adamw+cuttlefish"]
REGIMES = ["sltrain", "relora", "lost"]


def regime_of(name: str) -> tuple[str | None, float | None]:
    """(regime, learning rate override) of a row name such as ``sltrain`` or ``sltrain@3e-3``."""
    base, _, lr = name.partition("@")
    return (base, float(lr) if lr else None) if base in REGIMES else (None, None)


def split_lr(name: str) -> tuple[str, float | None]:
    """(base row, learning rate override) of any row name: ``adamw@3e-3`` -> ("adamw", 0.003)."""
    base, _, lr = name.partition("@")
    return base, (float(lr) if lr else None)


def row_lr(name: str, args: argparse.Namespace) -> float:
    """The learning rate a row trains at (its ``@LR`` or ``--lr``)."""
    return split_lr(name)[1] or args.lr


def run_config(args: argparse.Namespace, regime: str = "dense", lr: float | None = None) -> TrainRunConfig:
    """The ``rankwise train`` configuration of one row (the loop takes data, steps and batches from it)."""
    return TrainRunConfig(steps=args.steps, optimizer="adamw", regime=regime, from_scratch=True, data="ptb",
                          lr=lr or args.lr, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                          rank=args.regime_rank, sparse_density=args.sparse_density,
                          relora_every=args.relora_every, relora_warmup=args.relora_warmup)


def train_row(model: torch.nn.Module, tok: Any, opt: Any, args: argparse.Namespace, callbacks: list[Any],
              desc: str, scheduler: Any = None, config: TrainRunConfig | None = None) -> dict[str, Any]:
    """One row through the one training loop (``rankwise train``'s: the HF Trainer), constant LR unless given."""
    from rankwise.cli.train_cmd import fit

    return fit(model, tok, config or run_config(args, lr=row_lr(desc, args)), opt, scheduler=scheduler,
               callbacks=callbacks, progress=not args.quiet)


def release_memory() -> None:
    """Free Python garbage and hand freed heap back to the OS (so each run's RSS starts low)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def build_model(config: Any, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def build_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    lr = row_lr(name, args)
    name = split_lr(name)[0]
    if name.startswith("adamw"):
        return torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-6, weight_decay=0.0)
    groups = galore_param_groups(model, rank=args.rank, update_proj_gap=args.update_gap, scale=args.scale)
    if name == "galore-torch":
        return galore_torch_adamw()(groups, lr=lr, eps=1e-6, weight_decay=0.0, no_deprecation_warning=True)
    projection = {"rw-svd": "svd", "rw-randomized": "randomized", "rw-dct": "dct", "rw-fira": "svd",
                  "rw-svd-galore-eps": "svd"}[name]
    return GaLoreAdamW(groups, lr=lr, eps=1e-6, weight_decay=0.0, projection=projection,
                       fira=name == "rw-fira", seed=args.seed,
                       eps_style="galore" if name.endswith("galore-eps") else "torch")


class PeerRefreshTimer:
    """Times galore-torch's SVD refreshes (GaLoreProjector.get_orthogonal_matrix)."""

    def __init__(self) -> None:
        import galore_torch.galore_projector as gp

        self.cls = gp.GaLoreProjector
        self.orig = self.cls.get_orthogonal_matrix
        self.seconds: list[float] = []

    def __enter__(self) -> PeerRefreshTimer:
        orig, seconds = self.orig, self.seconds

        def timed(proj: Any, weights: torch.Tensor, rank: int, type: str) -> Any:  # noqa: A002
            t0 = time.perf_counter()
            out = orig(proj, weights, rank, type)
            seconds.append(time.perf_counter() - t0)
            return out

        self.cls.get_orthogonal_matrix = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self.cls.get_orthogonal_matrix = self.orig


def run_one(name: str, config: Any, tok: Any, test_text: str, args: argparse.Namespace) -> dict[str, Any]:
    release_memory()
    model = build_model(config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    regime_name, regime_lr = regime_of(name)
    regime = None
    if regime_name is not None:
        rcfg = run_config(args, regime_name, regime_lr)
        regime = build_regime(rcfg)
        regime.prepare(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=rcfg.learning_rate, eps=1e-6,
                                weight_decay=0.0)
    else:
        opt = build_optimizer(name, model, args)
    callbacks = []
    if name.endswith("+trp"):
        callbacks = [TRP(lam=args.trp_lam, every=args.trp_every, energy=args.trp_energy,
                         penalty_every=args.trp_penalty_every)]
    elif name.endswith("+cuttlefish"):
        callbacks = [Cuttlefish(check_every=args.cf_check_every, tol=args.cf_tol, patience=2)]
    scheduler, row_config = None, None
    if regime is not None:
        callbacks = regime.callbacks()
        scheduler = regime.scheduler(opt, args.steps)
        row_config = rcfg
    peer_timer = PeerRefreshTimer() if name == "galore-torch" else None
    rss = PeakMemory(interval_s=0.05)
    t0 = time.perf_counter()
    with rss:
        if peer_timer is not None:
            with peer_timer:
                result = train_row(model, tok, opt, args, callbacks, name)
        else:
            result = train_row(model, tok, opt, args, callbacks, name, scheduler=scheduler, config=row_config)
    wall = time.perf_counter() - t0
    refresh = peer_timer.seconds if peer_timer is not None else result["refresh_seconds"]
    n_refresh_steps = len(range(0, args.steps, args.update_gap))
    mem = optimizer_state_bytes(opt)
    ppl = perplexity(model, tok, test_text, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, name="ptb:test")
    valid = None  # held-out loss on PTB *valid* (learning rates are chosen here, never on test)
    if args.valid_tokens:
        valid = perplexity(model, tok, load_text("ptb", "valid"), seq_len=args.eval_seq_len,
                           max_tokens=args.valid_tokens, name="ptb:valid")
    n_params_end = sum(p.numel() for p in model.parameters())
    out = {
        "name": name,
        "state_bytes": mem.total,
        "state_bytes_projected": mem.projected,
        "state_bytes_plain": mem.plain,
        "state_bytes_logical": mem.logical,
        "state_bytes_logical_projected": mem.logical_projected,
        "peak_rss_bytes": rss.peak_bytes,
        "seconds_per_step": result["seconds_per_step"],
        "tokens_per_second": result["tokens"] / wall if wall > 0 else None,
        "train_seconds": wall,
        "refresh_seconds_total": sum(refresh) if refresh else None,
        "refresh_seconds_per_refresh": (sum(refresh) / n_refresh_steps) if refresh else None,
        "refresh_count_matrices": len(refresh),
        "final_loss": result["final_loss"],
        "losses": result["losses"],
        "perplexity": ppl.perplexity,
        "valid_perplexity": None if valid is None else valid.perplexity,
        "valid_loss": None if valid is None else math.log(valid.perplexity),
        "lr": row_lr(name, args),
        "params_start": n_params,
        "params_end": n_params_end,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "events": [e for e in result["events"] if e.get("action") in ("factorise", "merge")][:5],
        "n_factorised": sum(1 for e in result["events"] if e.get("action") == "factorise"),
    }
    if regime is not None:
        out["regime"] = regime.summary(model)
        out["lr"] = rcfg.learning_rate
    del model, opt, result
    release_memory()
    return out


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def print_tables(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["name"] == "adamw"), None)
    lines = [
        "| optimizer | state MiB (whole) | % AdamW | state MiB (projected) | % AdamW | peak RSS MiB | s/step "
        "| s/refresh | final loss | PTB ppl |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["name"] in CALLBACKS or regime_of(r["name"])[0]:
            continue
        pct = pct_p = "-"
        proj_bytes = r["adamw_projected_bytes"] if split_lr(r["name"])[0] == "adamw" else r["state_bytes_projected"]
        if base:
            pct = f"{100 * r['state_bytes'] / base['state_bytes']:.1f}"
            pct_p = f"{100 * proj_bytes / base['adamw_projected_bytes']:.1f}"
        ref = "-" if r["refresh_seconds_per_refresh"] is None else f"{r['refresh_seconds_per_refresh']:.2f}"
        lines.append(
            f"| {r['name']} | {mib(r['state_bytes'])} | {pct} | {mib(proj_bytes)} | {pct_p} | "
            f"{mib(r['peak_rss_bytes'])} | {r['seconds_per_step']:.2f} | {ref} | {r['final_loss']:.3f} | "
            f"{r['perplexity']:.1f} |"
        )
    cb_rows = [r for r in rows if r["name"] in CALLBACKS or r["name"] == "adamw"]
    if len(cb_rows) > 1:
        lines += ["", "| run | parameters at end | factorised matrices | final loss | PTB ppl |",
                  "|---|---|---|---|---|"]
        for r in cb_rows:
            lines.append(f"| {r['name']} | {r['params_end']:,} | {r['n_factorised']} | {r['final_loss']:.3f} | "
                         f"{r['perplexity']:.1f} |")
    reg_rows = [r for r in rows if regime_of(r["name"])[0] or r["name"] in ("adamw", "rw-svd")]
    if any(regime_of(r["name"])[0] for r in reg_rows):
        lines += ["", "| regime | lr | parameters | % AdamW | targeted matrices | % dense "
                  "| params at 30 layers (% dense) | trainable | state MiB | peak RSS MiB | tokens/s | final loss "
                  "| / AdamW | PTB ppl |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in reg_rows:
            tgt = r.get("targeted_params") or {}
            full = r.get("full_depth_params") or {}
            ratio = "-" if not base else f"{r['final_loss'] / base['final_loss']:.3f}"
            pp = "-" if not base else f"{100 * r['params_end'] / base['params_end']:.1f}"
            lines.append(
                f"| {r['name']} | {r.get('lr', '-')} | {r['params_end']:,} | {pp} | {tgt.get('regime', 0):,} | "
                f"{100 * tgt.get('ratio', 1):.1f} | {full.get('model_regime', 0):,} "
                f"({100 * full.get('model_ratio', 1):.1f}) | "
                f"{r['trainable_params']:,} | {mib(r['state_bytes'])} | {mib(r['peak_rss_bytes'])} | "
                f"{r['tokens_per_second']:.0f} | {r['final_loss']:.3f} | {ratio} | {r['perplexity']:.1f} |")
    tuned = tuned_comparison(rows)
    if tuned:
        lines += ["", "| row | lr | final loss (last 5) | / tuned AdamW | valid loss | / tuned AdamW "
                  "| mean loss per window (" + ", ".join(tuned["windows"]) + ") | paired Δ last 20 steps (± s.e.) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tuned["rows"]:
            vl = "-" if r["valid_loss"] is None else f"{r['valid_loss']:.3f}"
            vr = "-" if r["valid_vs_tuned_adamw"] is None else f"{r['valid_vs_tuned_adamw']:.3f}"
            lines.append(f"| {r['name']} | {r['lr']:g} | {r['final_loss']:.3f} | {r['final_vs_tuned_adamw']:.3f} "
                         f"| {vl} | {vr} | {' / '.join(f'{x:.3f}' for x in r['window_means'])} "
                         f"| {r['paired_diff_last20_mean']:+.3f} ± {r['paired_diff_last20_se']:.3f} |")
    text = "\n".join(lines)
    print(text)
    return text


def _windows(n_steps: int, width: int = 10, count: int = 3) -> list[tuple[int, int]]:
    """The last ``count`` windows of ``width`` steps ([start, end) step indices) of an ``n_steps`` run."""
    count = max(1, min(count, n_steps))
    width = max(1, min(width, n_steps // count))
    return [(n_steps - width * (count - i), n_steps - width * (count - 1 - i)) for i in range(count)]


def tuned_comparison(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """GaLore against a *tuned* AdamW: the best learning rate of every optimizer family, chosen on PTB valid.

    Families are the row names without ``@LR`` (``adamw``, ``rw-svd``, ...). The best row of a family has
    the lowest PTB-valid loss (the train loss where no valid loss was measured). Every row of one run sees
    the same batches, so differences are paired: the per-step difference to the tuned AdamW over the last
    20 steps gives a mean and a standard error, and the ranking of the rows is reported on the last three
    10-step windows (an order that flips between windows does not mean anything).
    """
    fam: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        base = split_lr(r["name"])[0]
        if base in OPTIMIZERS:
            fam.setdefault(base, []).append(r)
    if "adamw" not in fam or len(fam) < 2:
        return None

    # choose on PTB-valid loss when every row of the family has one, else (consistently) on the final train loss
    on_valid = {b: all(r.get("valid_loss") is not None for r in rs) for b, rs in fam.items()}
    best = {b: min(rs, key=lambda r, b=b: r["valid_loss"] if on_valid[b] else r["final_loss"])
            for b, rs in fam.items()}
    ref = best["adamw"]
    n = min(len(r["losses"]) for rs in fam.values() for r in rs)
    wins = _windows(n)
    out_rows = []
    for b, rs in fam.items():
        for r in sorted(rs, key=lambda x: x["lr"]):
            tail = slice(max(0, n - 20), n)
            diff = [a - c for a, c in zip(r["losses"][tail], ref["losses"][tail], strict=True)]
            mean = sum(diff) / len(diff)
            se = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff)) ** 0.5 if len(diff) > 1 else 0.0
            out_rows.append({
                "name": r["name"], "family": b, "lr": r["lr"], "best_of_family": r is best[b],
                "final_loss": r["final_loss"], "final_vs_tuned_adamw": r["final_loss"] / ref["final_loss"],
                "valid_loss": r.get("valid_loss"),
                "valid_vs_tuned_adamw": (r["valid_loss"] / ref["valid_loss"]
                                         if r.get("valid_loss") is not None and ref.get("valid_loss") else None),
                "window_means": [sum(r["losses"][a:e]) / (e - a) for a, e in wins],
                "paired_diff_last20_mean": mean, "paired_diff_last20_se": se})
    ranking = [[x["name"] for x in sorted(out_rows, key=lambda x: x["window_means"][i])] for i in range(len(wins))]
    lrs = sorted(r["lr"] for r in fam["adamw"])
    return {"windows": [f"steps {a + 1}-{e}" for a, e in wins], "rows": out_rows,
            "tuned_adamw": {"name": ref["name"], "lr": ref["lr"], "grid": lrs,
                            "interior": len(lrs) >= 3 and lrs[0] < ref["lr"] < lrs[-1]},
            "best_per_family": {b: r["name"] for b, r in best.items()},
            "chosen_on": {b: "valid loss" if v else "final train loss" for b, v in on_valid.items()},
            "ranking_per_window": ranking, "ranking_stable": all(x == ranking[-1] for x in ranking)}


def regime_params(config: Any, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Closed-form parameter counts of a regime on ``config``'s architecture (meta model: nothing allocated).

    Targeted matrices: dense m·n (+bias) against sltrain r(m+n) + ⌊δmn⌋, lost r(m+n) + m·round(δn),
    relora m·n + r(m+n) (the frozen W stays); whole model: the rest of the parameters added.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from rankwise.surgery.targets import find_targets
    from rankwise.train.regimes.lost import lost_channels
    from rankwise.train.regimes.sltrain import sltrain_nnz

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # on the meta device the head is not tied to the embeddings until asked
    total = sum(p.numel() for p in model.parameters())
    r, d = args.regime_rank, args.sparse_density
    dense = new = 0
    for t in find_targets(model):
        m, n = t.shape
        dense += m * n
        new += {"sltrain": r * (m + n) + sltrain_nnz(m, n, d), "lost": r * (m + n) + m * lost_channels(n, d),
                "relora": m * n + r * (m + n)}.get(name, m * n)
    return {"dense": dense, "regime": new, "ratio": new / dense, "model_dense": total,
            "model_regime": total - dense + new, "model_ratio": (total - dense + new) / total,
            "layers": config.num_hidden_layers}


def check_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, evaluated on the measured rows (None where a row is missing)."""
    by = {r["name"]: r for r in rows}
    adamw, peer = by.get("adamw"), by.get("galore-torch")
    rw = [n for n in ("rw-svd", "rw-randomized", "rw-dct", "rw-fira") if n in by]
    goals: dict[str, Any] = {}
    if adamw and rw:
        whole = {n: by[n]["state_bytes"] / adamw["state_bytes"] for n in rw}
        proj = {n: by[n]["state_bytes_projected"] / by[n]["adamw_projected_bytes"] for n in rw}
        goals["state_whole_le_50pct_of_adamw"] = {"ratios": whole, "met": all(v <= 0.5 for v in whole.values())}
        goals["state_projected_le_32pct_of_adamw"] = {"ratios": proj, "met": all(v <= 0.32 for v in proj.values())}
    if peer and rw:
        rel = {n: by[n]["final_loss"] / peer["final_loss"] - 1 for n in rw}
        goals["final_loss_within_5pct_of_galore_torch"] = {"relative": rel,
                                                           "met": all(abs(v) <= 0.05 for v in rel.values())}
        speed = {n: peer["refresh_seconds_per_refresh"] / by[n]["refresh_seconds_per_refresh"]
                 for n in ("rw-randomized", "rw-dct") if n in by and by[n]["refresh_seconds_per_refresh"]}
        goals["refresh_ge_3x_faster_than_galore_torch_svd"] = {"speedups": speed,
                                                               "met": any(v >= 3 for v in speed.values())}
    if peer and "rw-svd-galore-eps" in by:
        goals["parity_rw_svd_galore_eps_vs_galore_torch"] = {
            "final_loss_relative": by["rw-svd-galore-eps"]["final_loss"] / peer["final_loss"] - 1,
            "perplexity_relative": by["rw-svd-galore-eps"]["perplexity"] / peer["perplexity"] - 1,
        }
    sl = next((by[n] for n in by if regime_of(n)[0] == "sltrain"), None)
    if adamw and sl:
        goals["sltrain_params_le_60pct_of_dense"] = {
            "ratio_at_bench_depth": sl["params_end"] / adamw["params_end"],
            "ratio_at_30_layers": sl["full_depth_params"]["model_ratio"],
            "met_at_bench_depth": sl["params_end"] / adamw["params_end"] <= 0.6,
            "met_at_30_layers": sl["full_depth_params"]["model_ratio"] <= 0.6}
        rel = {n: by[n]["final_loss"] / adamw["final_loss"] - 1 for n in by if regime_of(n)[0] == "sltrain"}
        goals["sltrain_loss_within_10pct_of_adamw"] = {"relative": rel, "met": any(v <= 0.10 for v in rel.values())}
    tuned = tuned_comparison(rows)
    if tuned:
        fams = {x["family"]: x for x in tuned["rows"] if x["best_of_family"]}
        rel = {b: x["final_vs_tuned_adamw"] - 1 for b, x in fams.items() if b.startswith("rw-")}
        rel_valid = {b: x["valid_vs_tuned_adamw"] - 1 for b, x in fams.items()
                     if b.startswith("rw-") and x["valid_vs_tuned_adamw"] is not None}
        goals["galore_within_5pct_of_tuned_adamw"] = {
            "tuned_adamw": tuned["tuned_adamw"], "best_per_family": tuned["best_per_family"],
            "chosen_on": tuned["chosen_on"],
            "final_loss_relative": rel, "valid_loss_relative": rel_valid,
            "met_final_loss": {b: v <= 0.05 for b, v in rel.items()},
            "met_valid_loss": {b: v <= 0.05 for b, v in rel_valid.items()},
            "ranking_stable_over_last_3_windows": tuned["ranking_stable"]}
    if "rw-fira" in by and "rw-svd" in by:
        ref = [by["rw-svd"]["final_loss"]] + ([peer["final_loss"]] if peer else [])
        goals["fira_loss_le_galore"] = {"fira": by["rw-fira"]["final_loss"], "galore": ref,
                                        "met": by["rw-fira"]["final_loss"] <= min(ref)}
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--update-gap", type=int, default=200)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--valid-tokens", type=int, default=0,
                    help="also score this many PTB-valid tokens per row (learning rates are chosen on valid)")
    ap.add_argument("--trp-lam", type=float, default=1e-3)
    ap.add_argument("--trp-every", type=int, default=10)
    ap.add_argument("--trp-energy", type=float, default=0.9)
    ap.add_argument("--trp-penalty-every", type=int, default=10)
    ap.add_argument("--cf-check-every", type=int, default=3)
    ap.add_argument("--cf-tol", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: OpenMP spinning makes 2 threads far slower on a busy shared box)")
    ap.add_argument("--only", default=None, help="comma-separated subset of runs (regime rows: sltrain, relora, "
                    "lost, optionally @LR, e.g. sltrain@3e-3)")
    ap.add_argument("--layers", type=int, default=None, help="train a SmolLM2 of this depth (default: its 30)")
    ap.add_argument("--regime-rank", type=int, default=128, help="rank of the sltrain / relora / lost factors")
    ap.add_argument("--sparse-density", type=float, default=0.03, help="sltrain / lost sparse density")
    ap.add_argument("--relora-every", type=int, default=10, help="relora: steps between merges")
    ap.add_argument("--relora-warmup", type=int, default=2, help="relora: (re-)warm-up steps of the jagged cosine")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_memory.json"))
    ap.add_argument("--append", action="store_true",
                    help="add the rows of this invocation to an existing --out JSON (marked 'separate_process')")
    ap.add_argument("--render", default=None, help="only print the tables and goals of an existing JSON")
    ap.add_argument("--recount", action="store_true",
                    help="with --render: recompute the closed-form 30-layer parameter counts and store them")
    args = ap.parse_args(argv)
    if args.render and args.recount:  # closed-form parameter counts only (no training): recompute and store
        from transformers import AutoConfig

        saved = json.loads(Path(args.render).read_text())
        full = AutoConfig.from_pretrained(str(resolve_model(saved["settings"]["model"])))
        ns = argparse.Namespace(**saved["settings"])
        for r in saved["rows"]:
            r["full_depth_params"] = regime_params(full, regime_of(r["name"])[0] or "dense", ns)
        saved["goals"] = check_goals(saved["rows"])
        with atomic_file(args.render) as fh:
            fh.write(json.dumps(saved, indent=2) + "\n")
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        print_tables(saved["rows"])
        print(json.dumps(check_goals(saved["rows"]), indent=2))
        return 0

    from transformers import AutoConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = resolve_model(args.model)
    config = AutoConfig.from_pretrained(str(path))
    full_config = AutoConfig.from_pretrained(str(path))
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    tok = load_tokenizer(path)
    info = run_info()
    test_text = load_text("ptb", "test")
    names = OPTIMIZERS + CALLBACKS if args.only is None else args.only.split(",")
    t_start = time.perf_counter()
    # AdamW's bytes on the projected matrices alone: 2 moments of each of them (+ its step counter)
    model = build_model(config, args.seed)
    groups = galore_param_groups(model, rank=args.rank)
    adamw_proj = sum(2 * p.numel() * p.element_size() + 4 for p in groups[-1]["params"])
    del model, groups
    previous: dict[str, Any] | None = None
    if args.append and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())

    def write(new_rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        """The report of the rows so far (written after every row, so a killed run keeps what it measured)."""
        rows = list(new_rows)
        if previous is not None:
            rows = [r for r in previous["rows"] if r["name"] not in {x["name"] for x in rows}] + rows
        table = print_tables(rows) if complete else ""
        report = {
            "benchmark": "train_memory",
            "command": "python bench/train_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "complete": complete,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "model_architecture": args.model,
            "layers": config.num_hidden_layers,
            "run": info | {"load_avg_end": [round(x, 2) for x in os.getloadavg()]},
            "tokens_per_step": args.batch_size * args.seq_len,
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "torch": torch.__version__,
                        "load_avg_at_end": os.getloadavg()},
            "total_seconds": time.perf_counter() - t_start,
            "rows": rows,
            "table_markdown": table,
            "goals": check_goals(rows),
        }
        if previous is not None:
            report["command"] = previous["command"] + " ; then: " + report["command"]
            report["append_settings"] = report["settings"]
            report["settings"] = previous["settings"]
            report["total_seconds"] += previous.get("total_seconds", 0.0)
        with atomic_file(args.out) as fh:
            fh.write(json.dumps(report, indent=2) + "\n")
        return report

    rows: list[dict[str, Any]] = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        row = run_one(name, config, tok, test_text, args)
        row["targeted_params"] = regime_params(config, regime_of(name)[0] or "dense", args)
        row["full_depth_params"] = regime_params(full_config, regime_of(name)[0] or "dense", args)
        row["adamw_projected_bytes"] = adamw_proj
        if previous is not None:
            row["separate_process"] = True
        print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "events")}), file=sys.stderr, flush=True)
        rows.append(row)
        write(rows, complete=False)
    report = write(rows, complete=True)
    print(f"wrote {args.out} in {report['total_seconds'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model-wide figures of an inspection: WeLore classes, weighted means, energy savings, per-type medians."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from rankwise.errors import RankwiseError
from rankwise.inspection.config import InspectConfig

ENERGY_LEVELS = (90, 95, 99)
_LAYER_RX = re.compile(r"(?:^|\.)(\d+)\.")


def layer_index(name: str) -> int | None:
    """Depth of a module from its name: the first ``.<digits>.`` component (``layers.3.mlp`` → 3)."""
    m = _LAYER_RX.search(name)
    return int(m.group(1)) if m else None


def layer_type(name: str) -> str:
    """The module's role without its depth: the part after the layer index (``self_attn.q_proj``)."""
    m = _LAYER_RX.search(name)
    return name[m.end() :] if m else name


def welore_classes(
    svs: list[torch.Tensor], shapes: list[tuple[int, int]], rows: list[dict[str, Any]], cfg: InspectConfig
) -> tuple[float | None, dict[str, Any]]:
    """Set each row's ``welore_class``/``welore_rank`` at ``cfg.ratio``; returns (threshold, summary entry).

    Uses WeLore's data-free allocation (the public ``rankwise.compression.allocation`` entry point, the same
    one ``rankwise compress --alloc welore`` runs). An unreachable ratio is reported, not raised.
    """
    from rankwise.compression.allocation import welore_allocation

    try:
        alloc = welore_allocation(svs, shapes, cfg.ratio, min_saving=cfg.min_saving)
    except RankwiseError as exc:
        for row in rows:
            row["welore_class"] = None
            row["welore_rank"] = None
        return None, {"ratio": cfg.ratio, "threshold": None, "error": str(exc)}
    for row, rank, lrc in zip(rows, alloc.ranks, alloc.lrc):
        row["welore_class"] = "LRC" if lrc else "N-LRC"
        row["welore_rank"] = rank
    return alloc.threshold, {
        "ratio": cfg.ratio,
        "min_saving": cfg.min_saving,
        "threshold": alloc.threshold,
        "achieved_ratio": alloc.achieved_ratio,
        "n_lrc": int(sum(alloc.lrc)),
        "n_nlrc": int(len(alloc.lrc) - sum(alloc.lrc)),
    }


def _removed(row: dict[str, Any], k: int) -> int:
    """Parameters a rank-k factorisation removes (0 when k is at/above break-even: the layer stays dense)."""
    m, n = row["shape"]
    return max(0, m * n - k * (m + n))


def _wmean(rows: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(r["params"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    if not pairs:
        return None
    tot = sum(p for p, _ in pairs)
    return sum(p * v for p, v in pairs) / tot


def median(values: list[float | None]) -> float | None:
    """Median of the finite values (None when there are none)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else None


def summarise(rows: list[dict[str, Any]], cfg: InspectConfig, welore: dict[str, Any], compare: bool) -> dict[str, Any]:
    """The report's ``summary``: parameter-weighted means, energy-rank savings, WeLore, per-type medians."""
    total = sum(r["params"] for r in rows)
    rel: list[dict[str, float]] = []
    for r in rows:
        p = min(r["shape"])
        d = {f"_rel_{lv}": r[f"energy_rank_{lv}"] / p for lv in ENERGY_LEVELS}
        d["_rel_eff"] = r["effective_rank"] / p
        d["_rel_stable"] = r["stable_rank"] / p
        rel.append({**d, "params": r["params"]})
    means_keys = ["alpha", "stable_rank", "effective_rank", "condition_number"]
    if cfg.farms:
        means_keys.append("alpha_farms")
    if compare:
        means_keys += ["relative_spectral_change", "intruder_dimensions"]
    weighted = {k: _wmean(rows, k) for k in means_keys}
    weighted.update({f"energy_rank_{lv}_fraction": _wmean(rel, f"_rel_{lv}") for lv in ENERGY_LEVELS})
    weighted["effective_rank_fraction"] = _wmean(rel, "_rel_eff")
    weighted["stable_rank_fraction"] = _wmean(rel, "_rel_stable")
    energy = {}
    for lv in ENERGY_LEVELS:
        removed = sum(_removed(r, r[f"energy_rank_{lv}"]) for r in rows)
        energy[f"params_removed_energy_{lv}"] = removed
        energy[f"ratio_removed_energy_{lv}"] = removed / total if total else 0.0
        energy[f"matrices_factorisable_energy_{lv}"] = sum(
            1 for r in rows if r[f"energy_rank_{lv}"] < r["break_even_rank"]
        )
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_type[r["type"]].append(r)
    per_type = {}
    for typ, rs in by_type.items():
        entry = {
            "matrices": len(rs),
            "params": sum(r["params"] for r in rs),
            "alpha": median([r["alpha"] for r in rs]),
            "stable_rank": median([r["stable_rank"] for r in rs]),
            "effective_rank": median([r["effective_rank"] for r in rs]),
            "energy_rank_90": median([r["energy_rank_90"] for r in rs]),
            "break_even_rank": median([r["break_even_rank"] for r in rs]),
            "lrc": sum(1 for r in rs if r.get("welore_class") == "LRC"),
        }
        if cfg.farms:
            entry["alpha_farms"] = median([r.get("alpha_farms") for r in rs])
        if compare:
            entry["intruder_dimensions"] = sum(r["intruder_dimensions"] for r in rs)
            entry["relative_spectral_change"] = median([r["relative_spectral_change"] for r in rs])
        per_type[typ] = entry
    summary: dict[str, Any] = {
        "matrices": len(rows),
        "params": total,
        "weighted_means": weighted,
        **energy,
        "welore": welore,
        "alpha_fitted": sum(1 for r in rows if r["alpha"] is not None and math.isfinite(r["alpha"])),
        "by_type": per_type,
    }
    if compare:
        summary["intruder_dimensions"] = sum(r["intruder_dimensions"] for r in rows)
    return summary

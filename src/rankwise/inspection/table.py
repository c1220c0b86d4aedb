"""Terminal rendering of an :class:`~rankwise.inspection.api.InspectReport` with rich.

One row per matrix, then one row per layer type (medians over the depth), then
the model-wide totals: what energy truncation would remove and the WeLore
threshold at the requested ratio.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rankwise.inspection.api import InspectReport


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1e4:
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _alpha_style(a: Any) -> str:
    """Colour α as WeightWatcher reads it: < 2 very heavy (over-trained), 2–6 well trained, > 6 under-trained."""
    if a is None or not math.isfinite(a):
        return "dim"
    if a < 2:
        return "magenta"
    if a <= 6:
        return "green"
    return "yellow"


def matrix_table(report: InspectReport, max_rows: int | None = None) -> Table:
    """The per-matrix table (first ``max_rows`` rows when given)."""
    farms = any("alpha_farms" in r for r in report.matrices)
    compare = any("intruder_dimensions" in r for r in report.matrices)
    t = Table(title=f"rankwise inspect · {report.model}", title_justify="left", header_style="bold", box=None)
    cols = ["matrix", "shape", "k_be", "r90", "r95", "r99", "eff", "stable", "cond", "α", "KS"]
    if farms:
        cols.append("α_farms")
    cols.append("WeLore")
    if compare:
        cols += ["intr.", "Δσ"]
    for c in cols:
        t.add_column(c, justify="left" if c == "matrix" else "right", no_wrap=True)
    rows = report.matrices if max_rows is None else report.matrices[:max_rows]
    for r in rows:
        m, n = r["shape"]
        be = r["break_even_rank"]
        cells: list[Any] = [r["name"], f"{m}×{n}", str(be)]
        for lv in (90, 95, 99):
            k = r[f"energy_rank_{lv}"]
            cells.append(Text(str(k), style="cyan" if k < be else ""))
        cells += [
            _f(r["effective_rank"], 1),
            _f(r["stable_rank"], 1),
            _f(r["condition_number"], 0),
            Text(_f(r["alpha"]), style=_alpha_style(r["alpha"])),
            _f(r["alpha_ks"], 3),
        ]
        if farms:
            cells.append(Text(_f(r.get("alpha_farms")), style=_alpha_style(r.get("alpha_farms"))))
        cls = r.get("welore_class")
        cells.append(Text(cls or "–", style="cyan" if cls == "LRC" else "dim"))
        if compare:
            cells += [str(r["intruder_dimensions"]), _f(r["relative_spectral_change"], 4)]
        t.add_row(*cells)
    if max_rows is not None and len(report.matrices) > max_rows:
        t.caption = f"… {len(report.matrices) - max_rows} more rows (use --json for all)"
    return t


def type_table(report: InspectReport) -> Table:
    """Medians per layer type (``self_attn.q_proj``, ``mlp.down_proj``, …) over the depth."""
    by_type = report.summary["by_type"]
    farms = any("alpha_farms" in e for e in by_type.values())
    compare = any("intruder_dimensions" in e for e in by_type.values())
    t = Table(title="per layer type (medians over depth)", title_justify="left", header_style="bold", box=None)
    cols = ["type", "count", "params", "k_be", "r90", "eff", "stable", "α"]
    if farms:
        cols.append("α_farms")
    cols.append("LRC")
    if compare:
        cols += ["intr.", "Δσ"]
    for c in cols:
        t.add_column(c, justify="left" if c == "type" else "right", no_wrap=True)
    for typ, e in by_type.items():
        cells: list[Any] = [
            typ,
            str(e["matrices"]),
            f"{e['params'] / 1e6:.2f}M",
            _f(e["break_even_rank"], 0),
            _f(e["energy_rank_90"], 0),
            _f(e["effective_rank"], 1),
            _f(e["stable_rank"], 1),
            Text(_f(e["alpha"]), style=_alpha_style(e["alpha"])),
        ]
        if farms:
            cells.append(_f(e.get("alpha_farms")))
        cells.append(f"{e['lrc']}/{e['matrices']}")
        if compare:
            cells += [str(e["intruder_dimensions"]), _f(e["relative_spectral_change"], 4)]
        t.add_row(*cells)
    return t


def totals_text(report: InspectReport) -> Text:
    """One paragraph of model-wide numbers."""
    s = report.summary
    w = s["weighted_means"]
    lines = [
        f"{s['matrices']} matrices, {s['params'] / 1e6:.2f}M parameters; α fitted on {s['alpha_fitted']}; "
        f"parameter-weighted mean α {_f(w['alpha'])}, stable rank {_f(w['stable_rank'], 1)}, "
        f"effective rank {_f(w['effective_rank'], 1)}.",
        "energy truncation would remove "
        + ", ".join(
            f"{s[f'ratio_removed_energy_{lv}'] * 100:.1f} % at {lv} % "
            f"({s[f'matrices_factorisable_energy_{lv}']} matrices below break-even)"
            for lv in (90, 95, 99)
        )
        + ".",
    ]
    wl = s["welore"]
    if wl.get("threshold") is not None:
        lines.append(
            f"WeLore at ratio {wl['ratio']}: threshold σ/σ₁ ≥ {wl['threshold']:.4f}, {wl['n_lrc']} LRC / "
            f"{wl['n_nlrc']} N-LRC, achieved ratio {wl['achieved_ratio']:.3f}."
        )
    else:
        lines.append(f"WeLore at ratio {wl['ratio']}: {wl.get('error', 'not computed')}")
    if "intruder_dimensions" in s:
        lines.append(f"compared with {s.get('compare')}: {s['intruder_dimensions']} intruder dimensions in total.")
    return Text("\n".join(lines))


def render(report: InspectReport, max_rows: int | None = None) -> Group:
    """Everything the terminal shows, as one rich renderable."""
    return Group(matrix_table(report, max_rows), Text(""), type_table(report), Text(""), totals_text(report))

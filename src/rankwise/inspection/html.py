"""Self-contained HTML report of an inspection: matplotlib PNGs inlined as base64, no network needed.

Figures: α and stable rank against depth per matrix type, log-log eigenvalue
densities of a few matrices with their power-law fits, the WeLore threshold
picture (every matrix's normalised spectrum σᵢ/σ₁ against the model-wide
threshold), and with ``--farms`` / ``--compare`` their extra plots; then the
summary and the full per-matrix table.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from rankwise.engine.powerlaw import power_law_density
from rankwise.io.atomic import atomic_file

if TYPE_CHECKING:
    from rankwise.inspection.api import InspectReport


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _by_type(report: InspectReport) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in report.matrices:
        out[r["type"]].append(r)
    return out


def _depth_plot(report: InspectReport, key: str, ylabel: str, log: bool = False) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for typ, rows in _by_type(report).items():
        xs = [r["layer"] if r["layer"] is not None else i for i, r in enumerate(rows)]
        ys = [r.get(key) for r in rows]
        ys = [np.nan if v is None else v for v in ys]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=typ)
    if key.startswith("alpha"):
        ax.axhspan(2, 6, color="green", alpha=0.06, lw=0)
    positive = any(r.get(key) is not None and r.get(key) > 0 for r in report.matrices)
    if log and positive:
        ax.set_yscale("log")
    ax.set_xlabel("layer (depth)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    return _png(fig)


def pick_examples(report: InspectReport, count: int = 4) -> list[str]:
    """A few matrices worth plotting: first / middle / last depth of the most common types, with a fit."""
    names = [r["name"] for r in report.matrices if r["name"] in report.spectra and r["alpha"] is not None
             and math.isfinite(r["alpha"])]
    if not names:
        return []
    picks = [names[0], names[len(names) // 3], names[(2 * len(names)) // 3], names[-1]]
    out: list[str] = []
    for n in picks:
        if n not in out:
            out.append(n)
    return out[:count]


def _esd_plot(report: InspectReport, names: list[str]) -> str:
    plt = _plt()
    cols = 2
    rows_ = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows_, cols, figsize=(8, 3.1 * rows_), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        ev = report.spectra[name] ** 2
        ev = ev[ev > 1e-5]
        fit = report.fits[name]
        bins = np.logspace(np.log10(ev.min()), np.log10(ev.max()), 40)
        dens, edges = np.histogram(ev, bins=bins, density=True)
        centers = np.sqrt(edges[:-1] * edges[1:])
        ax.loglog(centers[dens > 0], dens[dens > 0], "o", ms=3, color="C0", label="ESD")
        if math.isfinite(fit.alpha):
            tail = ev[ev >= fit.xmin]
            xs = np.logspace(np.log10(fit.xmin), np.log10(ev.max()), 50)
            frac = len(tail) / len(ev)  # the fit is the density of the tail; scale it to the whole ESD
            ax.loglog(xs, frac * power_law_density(xs, fit), "-", color="C3", lw=1.5,
                      label=f"power law α={fit.alpha:.2f}")
            ax.axvline(fit.xmin, color="C1", ls="--", lw=1, label="λ_min")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("eigenvalue λ = σ²", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _welore_plot(report: InspectReport) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    seen: set[str] = set()
    for r in report.matrices:
        s = report.spectra.get(r["name"])
        if s is None or len(s) == 0 or s[0] <= 0:
            continue
        cls = r.get("welore_class") or "none"
        color = {"LRC": "C0", "N-LRC": "C3"}.get(cls, "0.5")
        lab = cls if cls not in seen else None
        seen.add(cls)
        ax.plot(np.arange(1, len(s) + 1) / len(s), s / s[0], color=color, lw=0.6, alpha=0.5, label=lab)
    t = report.welore_threshold
    if t is not None:
        ax.axhline(t, color="k", ls="--", lw=1.2, label=f"threshold t = {t:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("normalised index i / min(m, n)")
    ax.set_ylabel("σᵢ / σ₁")
    ratio = report.summary.get("welore", {}).get("ratio")
    ax.set_title(f"WeLore: one global threshold on normalised singular values (ratio {ratio})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _farms_plot(report: InspectReport) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for typ, rows in _by_type(report).items():
        a = [r["alpha"] for r in rows]
        b = [r.get("alpha_farms") for r in rows]
        pts = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x)
               and math.isfinite(y)]
        if pts:
            ax.scatter(*zip(*pts), s=10, label=typ)
    lim = ax.get_xlim()
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("α (whole matrix)")
    ax.set_ylabel("α (FARMS)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.muted{color:#666;font-size:13px} img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px;width:100%} th,td{padding:2px 6px;text-align:right;
border-bottom:1px solid #f0f0f0} th{background:#fafafa;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px} .kv td{text-align:left}
.lrc{color:#1f77b4;font-weight:600} .nlrc{color:#c0392b}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or abs(v) < 1e-3 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, list):
        return "×".join(str(x) for x in v)
    return html.escape(str(v))


def render_html(report: InspectReport) -> str:
    """The whole report as one HTML string."""
    s = report.summary
    w = s["weighted_means"]
    figs: list[tuple[str, str, str]] = [
        ("α against depth", _depth_plot(report, "alpha", "heavy-tail exponent α"),
         "Power-law exponent of each matrix's eigenvalue tail (smaller = heavier tail; 2–6 shaded)."),
        ("Stable rank against depth", _depth_plot(report, "stable_rank", "stable rank ‖W‖²_F/‖W‖²₂", log=True),
         "How many directions carry the Frobenius energy, relative to the largest one."),
    ]
    ex = pick_examples(report)
    if ex:
        figs.append(("Eigenvalue densities (log-log) with power-law fits", _esd_plot(report, ex),
                     "Histogram of λ = σ² on logarithmic bins; the red line is the fitted tail density."))
    figs.append(("WeLore threshold", _welore_plot(report),
                 "Each line is one matrix's σᵢ/σ₁; a matrix keeps the directions above the dashed threshold. "
                 "Blue: low-rank components (LRC, factorised); red: N-LRC (kept dense)."))
    if any("alpha_farms" in r for r in report.matrices):
        figs.append(("FARMS α against plain α", _farms_plot(report),
                     "α fitted on pooled square submatrix spectra (aspect-ratio free) against the whole-matrix fit."))
    if any("intruder_dimensions" in r for r in report.matrices):
        figs.append(("Intruder dimensions against depth", _depth_plot(report, "intruder_dimensions", "intruders"),
                     "Top singular vectors of the tuned matrix with no close match (|cos| below ε) in the base."))
        figs.append(("Relative spectral change against depth",
                     _depth_plot(report, "relative_spectral_change", "‖σ′−σ‖/‖σ‖", log=True), ""))

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>rankwise inspect · {html.escape(report.model)}</title><style>{_CSS}</style></head><body>",
        f"<h1>rankwise inspect · {html.escape(report.model)}</h1>",
        f"<p class='muted'>{s['matrices']} matrices · {s['params'] / 1e6:.2f} M parameters · "
        f"α fitted on {s['alpha_fitted']}</p>",
        "<h2>Summary</h2><table class='kv'>",
    ]
    kv = [
        ("parameter-weighted mean α", w.get("alpha")),
        ("parameter-weighted mean stable rank", w.get("stable_rank")),
        ("parameter-weighted mean effective rank", w.get("effective_rank")),
    ]
    for lv in (90, 95, 99):
        kv.append((f"removed by energy truncation at {lv} %",
                   f"{s[f'params_removed_energy_{lv}']:,} ({s[f'ratio_removed_energy_{lv}'] * 100:.1f} %)"))
    wl = s["welore"]
    if wl.get("threshold") is not None:
        kv.append((f"WeLore at ratio {wl['ratio']}",
                   f"threshold {wl['threshold']:.4f}, {wl['n_lrc']} LRC / {wl['n_nlrc']} N-LRC, "
                   f"achieved {wl['achieved_ratio']:.3f}"))
    else:
        kv.append((f"WeLore at ratio {wl['ratio']}", wl.get("error", "")))
    for k, v in kv:
        parts.append(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>")
    parts.append("</table>")
    for title, png, caption in figs:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if caption:
            parts.append(f"<p class='muted'>{html.escape(caption)}</p>")
        parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")

    parts.append("<h2>Per layer type (medians over depth)</h2><table><tr>")
    tcols = ["type", "matrices", "params", "break_even_rank", "energy_rank_90", "effective_rank", "stable_rank",
             "alpha", "lrc"]
    parts.append("".join(f"<th>{c}</th>" for c in tcols) + "</tr>")
    for typ, e in s["by_type"].items():
        row = {"type": typ, **e}
        parts.append("<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in tcols) + "</tr>")
    parts.append("</table>")

    parts.append("<h2>All matrices</h2><table><tr>")
    mcols = ["name", "shape", "break_even_rank", "energy_rank_90", "energy_rank_95", "energy_rank_99",
             "effective_rank", "stable_rank", "condition_number", "alpha", "alpha_ks", "welore_class"]
    extra = [c for c in ("alpha_farms", "intruder_dimensions", "relative_spectral_change")
             if any(c in r for r in report.matrices)]
    mcols += extra
    parts.append("".join(f"<th>{c}</th>" for c in mcols) + "</tr>")
    for r in report.matrices:
        cells = []
        for c in mcols:
            v = r.get(c)
            cls = {"LRC": " class='lrc'", "N-LRC": " class='nlrc'"}.get(v, "") if c == "welore_class" else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table><p class='muted'>Generated by rankwise; every plot is inlined, no network needed.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: InspectReport, path: str | os.PathLike) -> None:
    """Render and write the report atomically (nothing half-written on error or Ctrl-C)."""
    text = render_html(report)
    with atomic_file(path) as fh:
        fh.write(text)

"""``rankwise.inspect``: per-matrix spectra and metrics of a model (methods.md §1).

One pass computes the singular values of every targeted matrix, batched by
shape (``engine.svd.spectra``), and derives every metric from them: break-even
rank, energy ranks at 90/95/99 %, effective and stable rank, nuclear and L1,2
norms, condition number, the heavy-tail exponent α (WeightWatcher's fit), the
model-wide WeLore LRC / N-LRC class at a compression ratio, and optionally the
aspect-ratio-free α (FARMS) and, against a fine-tuned version of the model,
intruder dimensions and the relative spectral change.

The report is a plain object: ``to_dict()`` is the JSON the CLI writes,
``table()`` the rich table, ``write_html(path)`` the self-contained report.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rankwise.engine.metrics import (
    break_even_rank,
    condition_number,
    effective_rank,
    energy_rank,
    l12_norm,
    nuclear_norm,
    stable_rank,
)
from rankwise.engine.powerlaw import PowerLawFit, fit_power_law
from rankwise.engine.svd import spectra as batched_spectra
from rankwise.engine.threads import torch_threads
from rankwise.errors import RankwiseError, check_ratio
from rankwise.surgery.targets import Target, find_targets

ENERGY_LEVELS = (90, 95, 99)
_BATCH_BYTES = 64 * 2**20  # small enough batches that the progress bar moves, large enough to batch well

#: the per-matrix JSON keys always present (the issue's contract); more are added after them
MATRIX_KEYS = (
    "name",
    "shape",
    "break_even_rank",
    "energy_rank_90",
    "energy_rank_95",
    "energy_rank_99",
    "effective_rank",
    "stable_rank",
    "nuclear_norm",
    "l12_norm",
    "condition_number",
    "alpha",
    "alpha_xmin",
    "alpha_ks",
    "welore_class",
)


@dataclass
class InspectConfig:
    """What to inspect and how.

    ``targets``/``exclude``: regexes over module names (default: every Linear /
    Conv1D except the LM head and layers tied to the embeddings). ``ratio``: the
    compression ratio (fraction of targeted parameters removed) at which the
    WeLore threshold and LRC / N-LRC classes are computed. ``farms``: also fit
    α on FARMS submatrix spectra. ``compare``: a fine-tuned model (module, name
    or folder) with the same targets; adds intruder dimensions (``intruder_top``
    top singular vectors of the tuned matrix whose best |cosine| to every
    singular vector of the base matrix is below ``intruder_eps``) and the
    relative spectral change ‖σ′ − σ‖₂ / ‖σ‖₂. ``progress``: show a progress bar
    on stderr. ``spectrum_method``: ``"gram"`` (default; float64 eigenvalues of
    the smaller Gram matrix, several times faster than an SVD on CPU) or
    ``"svd"`` (float32 ``svdvals``); see ``engine.svd.spectra``. ``threads``:
    torch threads used while computing (default 1; ``None`` or 0 keeps torch's
    setting). One thread is the robust default: the decompositions are small
    and batched, and on a shared, oversubscribed CPU multi-threaded LAPACK
    calls can slow down by orders of magnitude (measured: ``eigvalsh`` on ten
    576×576 matrices 0.5 s with 1 thread, 100 s with 2 threads on 2 busy cores).
    """

    targets: str | None = None
    exclude: str | None = None
    ratio: float = 0.2
    min_saving: float = 0.1
    farms: bool = False
    farms_side: int | None = None
    compare: str | os.PathLike | nn.Module | None = None
    intruder_eps: float = 0.5
    intruder_top: int = 10
    progress: bool = True
    keep_spectra: bool = True
    spectrum_method: str = "gram"
    threads: int | None = 1

    def validate(self) -> None:
        """Raise :class:`RankwiseError` for a bad ratio, ε or top-k."""
        check_ratio(self.ratio)
        if not 0.0 < float(self.intruder_eps) < 1.0:
            raise RankwiseError(f"intruder_eps must lie in (0, 1) (a cosine similarity), got {self.intruder_eps}.")
        if int(self.intruder_top) < 1:
            raise RankwiseError(f"intruder_top must be at least 1, got {self.intruder_top}.")
        if self.threads is not None and int(self.threads) < 0:
            raise RankwiseError(f"threads must be 0 (torch's default) or a positive count, got {self.threads}.")
        if self.spectrum_method not in ("gram", "svd"):
            raise RankwiseError(f"spectrum_method must be 'gram' or 'svd', got {self.spectrum_method!r}.")
        if not 0.0 <= float(self.min_saving) < 1.0:
            raise RankwiseError(f"min_saving must lie in [0, 1), got {self.min_saving}.")


@dataclass
class InspectReport:
    """The result of :func:`inspect`: one dict per matrix, a summary, and the spectra."""

    model: str
    matrices: list[dict[str, Any]]
    summary: dict[str, Any]
    spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    fits: dict[str, PowerLawFit] = field(default_factory=dict, repr=False)
    welore_threshold: float | None = None
    config: InspectConfig | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """``{"model": ..., "matrices": [...], "summary": {...}}``, JSON-safe (NaN → null)."""
        return _json_safe({"model": self.model, "matrices": self.matrices, "summary": self.summary})

    def __getitem__(self, name: str) -> dict[str, Any]:
        for row in self.matrices:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.matrices)

    def table(self, max_rows: int | None = None):
        """A rich renderable: the per-matrix table and the per-layer-type summary."""
        from rankwise.inspection.table import render

        return render(self, max_rows=max_rows)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` to ``path`` (atomically) or to stdout for ``"-"``."""
        from rankwise.cli.common import write_json

        write_json(self.to_dict(), str(path))

    def write_html(self, path: str | os.PathLike) -> None:
        """Write the self-contained HTML report (plots inlined as PNG) to ``path`` atomically."""
        from rankwise.inspection.html import write_html

        write_html(self, path)


def _json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, np.generic):
        return _json_safe(o.item())
    return o


_LAYER_RX = re.compile(r"(?:^|\.)(\d+)\.")


def layer_index(name: str) -> int | None:
    """Depth of a module from its name: the first ``.<digits>.`` component (``layers.3.mlp`` → 3)."""
    m = _LAYER_RX.search(name)
    return int(m.group(1)) if m else None


def layer_type(name: str) -> str:
    """The module's role without its depth: the part after the layer index (``self_attn.q_proj``)."""
    m = _LAYER_RX.search(name)
    return name[m.end() :] if m else name


def _load(model: str | os.PathLike | nn.Module | None) -> tuple[nn.Module, str]:
    module, label = _load_raw(model)
    from rankwise.io.checkpoint import factorised_layers, to_dense

    if factorised_layers(module):  # a compressed model: inspect the dense matrices B A it computes
        module = to_dense(module)
    return module, label


def _load_raw(model: str | os.PathLike | nn.Module | None) -> tuple[nn.Module, str]:
    if isinstance(model, nn.Module):
        label = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        return model, label
    from rankwise.io.models import DEFAULT_MODEL, is_rankwise_checkpoint, load_model, resolve_model

    name = str(model) if model is not None else DEFAULT_MODEL
    path = resolve_model(name)
    if is_rankwise_checkpoint(path):
        return load_model(path), name
    task = "base"
    try:
        import json

        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise RankwiseError(f"{path / 'config.json'} is unreadable ({exc}); re-save the model folder.") from exc
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        task = "causal-lm"
    return load_model(path, task=task), name


def _check_finite(targets: list[Target], label: str = "") -> None:
    for t in targets:
        w = t.module.weight
        if not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise RankwiseError(
                f"weight {t.name}{label} has {bad} NaN/Inf entries; the model is broken, "
                "re-create it (or exclude that layer with --targets)."
            )


def farms_eigenvalues(w: torch.Tensor, side: int | None = None) -> np.ndarray:
    """Eigenvalues of square submatrices of ``w`` pooled into one spectrum (FARMS).

    The matrix is covered by ``side``×``side`` windows (default: half the
    smaller dimension, at least 16), evenly spaced along each axis with overlap
    where the size does not divide; each window's eigenvalues σ² are computed
    (batched), scaled by 1/side so windows of a matrix are comparable, and
    pooled. Pooling equal-size windows is averaging their eigenvalue densities
    at one fixed aspect ratio (1), which removes the aspect-ratio bias of
    fitting α on the whole rectangular matrix.
    """
    m, n = w.shape
    p = min(m, n)
    s = int(side) if side else max(min(16, p), p // 2)
    s = max(1, min(s, p))

    def starts(size: int) -> list[int]:
        k = max(1, math.ceil(size / s))
        if k == 1:
            return [0]
        return sorted({round(i * (size - s) / (k - 1)) for i in range(k)})

    x = w.detach().to(torch.float32)
    blocks = [x[r : r + s, c : c + s] for r in starts(m) for c in starts(n)]
    sv = torch.linalg.svdvals(torch.stack(blocks))
    return ((sv.double() ** 2) / s).flatten().numpy()


def left_singular_vectors(w: torch.Tensor, rel_floor: float = 1e-12) -> torch.Tensor:
    """Left singular vectors of ``w`` (m×n), columns by descending σ, via a float64 symmetric eigensolver.

    For m ≤ n they are the eigenvectors of W Wᵀ; for m > n, U = W V Σ⁻¹ from the
    eigenvectors V of WᵀW (directions with σ below ``rel_floor``·σ₁ dropped).
    In float64 this is accurate to ~1e-16·σ₁/σᵢ and several times cheaper than
    ``torch.linalg.svd`` with vectors on CPU.
    """
    x = w.detach().to(torch.float64)
    m, n = x.shape
    if m <= n:
        _, q = torch.linalg.eigh(x @ x.T)
        return q.flip(-1)
    lam, v = torch.linalg.eigh(x.T @ x)
    lam, v = lam.flip(-1), v.flip(-1)
    sv = lam.clamp_min(0).sqrt()
    keep = sv > rel_floor * float(sv[0]) if len(sv) else sv > 0
    return (x @ v[:, keep]) / sv[keep]


def _intruders(w0: torch.Tensor, w1: torch.Tensor, top: int, eps: float) -> int:
    """How many of the ``top`` left singular vectors of ``w1`` have max |cos| < eps to every one of ``w0``."""
    u0 = left_singular_vectors(w0)
    u1 = left_singular_vectors(w1)
    k = min(top, u1.shape[1])
    sim = (u1[:, :k].T @ u0).abs().max(dim=1).values
    return int((sim < eps).sum())


def _progress(enabled: bool, total: int, label: str):
    """A rich progress bar on stderr (or a no-op) as a context manager yielding an ``advance(n)`` callable."""

    @contextlib.contextmanager
    def cm():
        if not enabled:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from rankwise.cli.common import console

        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as prog:
            task = prog.add_task(label, total=total)
            yield lambda n=1: prog.advance(task, n)

    return cm()


def inspect(
    model: str | os.PathLike | nn.Module | None = None,
    config: InspectConfig | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> InspectReport:
    """Compute the spectral report of ``model`` (an ``nn.Module``, a built-in name or a folder).

    Raises :class:`RankwiseError` for an unknown model, targets matching
    nothing, a NaN/Inf weight (naming the matrix), a bad ratio, or a
    ``compare`` model whose matrices do not line up.
    """
    cfg = config or InspectConfig()
    cfg.validate()
    with torch_threads(cfg.threads):
        return _inspect(model, cfg, on_progress)


def _inspect(
    model: str | os.PathLike | nn.Module | None,
    cfg: InspectConfig,
    on_progress: Callable[[int], None] | None,
) -> InspectReport:
    module, label = _load(model)
    targets = find_targets(module, cfg.targets, cfg.exclude)
    _check_finite(targets)
    tuned_targets: list[Target] | None = None
    if cfg.compare is not None:
        tuned, tuned_label = _load(cfg.compare)
        by_name = {t.name: t for t in find_targets(tuned, None, None, include_heads=True)}
        tuned_targets = []
        for t in targets:
            u = by_name.get(t.name)
            if u is None or u.shape != t.shape:
                got = "missing" if u is None else f"shape {list(u.shape)}"
                raise RankwiseError(
                    f"--compare model {tuned_label} does not match: {t.name} is {got} there, {list(t.shape)} here; "
                    "compare a model with its own fine-tuned (merged) version."
                )
            tuned_targets.append(u)
        _check_finite(tuned_targets, f" (in {tuned_label})")

    weights = [t.weight() for t in targets]
    n = len(targets)
    steps = n * (2 + int(cfg.farms) + (1 if tuned_targets else 0))
    with _progress(cfg.progress, steps, f"inspecting {n} matrices") as advance:

        def done(k: int) -> None:
            advance(k)
            if on_progress is not None:
                on_progress(k)

        svs = batched_spectra(weights, on_done=done, method=cfg.spectrum_method, max_batch_bytes=_BATCH_BYTES)
        rows: list[dict[str, Any]] = []
        fits: dict[str, PowerLawFit] = {}
        spec_np: dict[str, np.ndarray] = {}
        for t, w, s in zip(targets, weights, svs):
            m, nn_ = t.shape
            s64 = s.double()
            fit = fit_power_law((s64**2).numpy())
            fits[t.name] = fit
            if cfg.keep_spectra:
                spec_np[t.name] = s64.numpy()
            row: dict[str, Any] = {
                "name": t.name,
                "shape": [m, nn_],
                "break_even_rank": break_even_rank(m, nn_),
                **{f"energy_rank_{lv}": energy_rank(s, lv / 100) for lv in ENERGY_LEVELS},
                "effective_rank": effective_rank(s),
                "stable_rank": stable_rank(s),
                "nuclear_norm": nuclear_norm(s),
                "l12_norm": l12_norm(w),
                "condition_number": condition_number(s),
                "alpha": fit.alpha,
                "alpha_xmin": fit.xmin,
                "alpha_ks": fit.ks,
                "welore_class": None,
                # additions beyond the contract
                "type": layer_type(t.name),
                "layer": layer_index(t.name),
                "params": m * nn_,
                "spectral_norm": float(s64[0]) if len(s64) else 0.0,
                "frobenius_norm": float(s64.pow(2).sum().sqrt()),
                "alpha_n_tail": fit.n_tail,
            }
            rows.append(row)
            done(1)

        if cfg.farms:
            for w, row in zip(weights, rows):
                ffit = fit_power_law(farms_eigenvalues(w, cfg.farms_side))
                row["alpha_farms"] = ffit.alpha
                row["alpha_farms_xmin"] = ffit.xmin
                row["alpha_farms_ks"] = ffit.ks
                done(1)

        if tuned_targets is not None:
            tuned_w = [u.weight() for u in tuned_targets]
            tuned_s = batched_spectra(tuned_w, method=cfg.spectrum_method, max_batch_bytes=_BATCH_BYTES)
            for w0, w1, s0, s1, row in zip(weights, tuned_w, svs, tuned_s, rows):
                s0d, s1d = s0.double(), s1.double()
                row["intruder_dimensions"] = _intruders(w0, w1, cfg.intruder_top, cfg.intruder_eps)
                row["relative_spectral_change"] = float(
                    torch.linalg.vector_norm(s1d - s0d) / torch.linalg.vector_norm(s0d).clamp_min(1e-300)
                )
                dw = torch.linalg.matrix_norm((w1 - w0).double())
                row["relative_weight_change"] = float(dw / torch.linalg.matrix_norm(w0.double()).clamp_min(1e-300))
                done(1)

    threshold, welore_info = _welore(svs, [t.shape for t in targets], rows, cfg)
    summary = _summary(rows, cfg, welore_info, compare=tuned_targets is not None)
    if tuned_targets is not None:
        summary["compare"] = str(cfg.compare if not isinstance(cfg.compare, nn.Module) else "module")
    return InspectReport(
        model=label,
        matrices=rows,
        summary=summary,
        spectra=spec_np,
        fits=fits,
        welore_threshold=threshold,
        config=cfg,
    )


def _welore(
    svs: list[torch.Tensor], shapes: list[tuple[int, int]], rows: list[dict[str, Any]], cfg: InspectConfig
) -> tuple[float | None, dict[str, Any]]:
    from rankwise.compression.allocation.welore import welore_allocation

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


def _summary(
    rows: list[dict[str, Any]], cfg: InspectConfig, welore: dict[str, Any], compare: bool
) -> dict[str, Any]:
    total = sum(r["params"] for r in rows)
    for r in rows:
        p = min(r["shape"])
        for lv in ENERGY_LEVELS:
            r[f"_rel_{lv}"] = r[f"energy_rank_{lv}"] / p
        r["_rel_eff"] = r["effective_rank"] / p
        r["_rel_stable"] = r["stable_rank"] / p
    means_keys = ["alpha", "stable_rank", "effective_rank", "condition_number"]
    if cfg.farms:
        means_keys.append("alpha_farms")
    if compare:
        means_keys += ["relative_spectral_change", "intruder_dimensions"]
    weighted = {k: _wmean(rows, k) for k in means_keys}
    weighted.update({f"energy_rank_{lv}_fraction": _wmean(rows, f"_rel_{lv}") for lv in ENERGY_LEVELS})
    weighted["effective_rank_fraction"] = _wmean(rows, "_rel_eff")
    weighted["stable_rank_fraction"] = _wmean(rows, "_rel_stable")
    energy = {}
    for lv in ENERGY_LEVELS:
        removed = sum(_removed(r, r[f"energy_rank_{lv}"]) for r in rows)
        energy[f"params_removed_energy_{lv}"] = removed
        energy[f"ratio_removed_energy_{lv}"] = removed / total if total else 0.0
        energy[f"matrices_factorisable_energy_{lv}"] = sum(
            1 for r in rows if r[f"energy_rank_{lv}"] < r["break_even_rank"]
        )
    for r in rows:
        for k in [k for k in r if k.startswith("_rel")]:
            del r[k]
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_type[r["type"]].append(r)
    per_type = {}
    for typ, rs in by_type.items():
        entry = {
            "matrices": len(rs),
            "params": sum(r["params"] for r in rs),
            "alpha": _median([r["alpha"] for r in rs]),
            "stable_rank": _median([r["stable_rank"] for r in rs]),
            "effective_rank": _median([r["effective_rank"] for r in rs]),
            "energy_rank_90": _median([r["energy_rank_90"] for r in rs]),
            "break_even_rank": _median([r["break_even_rank"] for r in rs]),
            "lrc": sum(1 for r in rs if r.get("welore_class") == "LRC"),
        }
        if cfg.farms:
            entry["alpha_farms"] = _median([r.get("alpha_farms") for r in rs])
        if compare:
            entry["intruder_dimensions"] = sum(r["intruder_dimensions"] for r in rs)
            entry["relative_spectral_change"] = _median([r["relative_spectral_change"] for r in rs])
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


def _median(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else None

"""``rankwise.inspect``: per-matrix spectra and metrics of a model (docs/methods.md §1).

One pass computes the singular values of every targeted matrix, batched by
shape (``engine.svd.spectra``), and derives every metric from them: break-even
rank, energy ranks at 90/95/99 %, effective and stable rank, nuclear and L1,2
norms, condition number, the heavy-tail exponent α (WeightWatcher's fit), the
model-wide WeLore LRC / N-LRC class at a compression ratio, and optionally the
aspect-ratio-free α (FARMS) and, against a fine-tuned version of the model,
intruder dimensions and the relative spectral change.

A model folder is streamed (``inspection.loading``): one tensor at a time is read
from its safetensors and the model is never built, so peak memory is about one
matrix (its float64 copy and Gram matrix). A model in memory gives the same rows.

Modules: ``config`` (InspectConfig), ``loading`` (sources of matrices),
``report`` (InspectReport, JSON), ``summary`` (model-wide figures); the linear
algebra lives in ``rankwise.engine`` (svd, metrics, powerlaw, subspace).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rankwise.config import check_config_type
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
from rankwise.engine.subspace import farms_eigenvalues, intruder_count, left_singular_vectors
from rankwise.engine.svd import spectra as batched_spectra
from rankwise.engine.threads import torch_threads
from rankwise.errors import RankwiseError
from rankwise.inspection.config import InspectConfig
from rankwise.inspection.loading import ModuleSource, StreamSource, check_finite, open_source
from rankwise.inspection.report import MATRIX_KEYS, InspectReport, json_safe
from rankwise.inspection.summary import ENERGY_LEVELS, layer_index, layer_type, summarise, welore_classes

__all__ = [
    "ENERGY_LEVELS",
    "MATRIX_KEYS",
    "InspectConfig",
    "InspectReport",
    "farms_eigenvalues",
    "inspect",
    "json_safe",
    "layer_index",
    "layer_type",
    "left_singular_vectors",
]

Source = ModuleSource | StreamSource


def inspect(
    model: str | os.PathLike | nn.Module | None = None,
    config: InspectConfig | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> InspectReport:
    """Compute the spectral report of ``model`` (an ``nn.Module``, a built-in name or a folder).

    A folder (or built-in name) with safetensors is streamed one tensor at a time
    unless ``config.stream`` is False. ``on_progress(n)`` is called as matrices finish.

    Raises :class:`RankwiseError` for an unknown model, targets matching
    nothing, a NaN/Inf weight (naming the matrix), a bad ratio, or a
    ``compare`` model whose matrices do not line up.
    """
    cfg = check_config_type(config, InspectConfig, "rankwise.inspect")
    cfg.validate()
    from rankwise.engine.device import resolve_device

    device = resolve_device(cfg.device)
    with torch_threads(cfg.threads):
        return _inspect(model, cfg, device, on_progress)


def _batches(refs: list, max_batch_bytes: int) -> list[list[int]]:
    """Indices grouped by shape (first-seen order), each group cut to ≤ ``max_batch_bytes`` of work memory."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, r in enumerate(refs):
        groups[r.shape].append(i)
    out: list[list[int]] = []
    for (m, n), idx in groups.items():
        per = max(1, int(max_batch_bytes // (4 * m * n * 3)))  # same budget rule as engine.svd.spectra
        out.extend(idx[s : s + per] for s in range(0, len(idx), per))
    return out


def _open(model: Any, cfg: InspectConfig, notes: list[str], include_heads: bool = False,
          targets: str | None = None, exclude: str | None = None) -> Source:
    return open_source(model, dtype=cfg.dtype, stream=cfg.stream, targets=targets, exclude=exclude,
                       include_heads=include_heads, notes=notes.append)


def _compare_model(model: Any, compare: Any, notes: list[str]) -> Any:
    """``compare`` as given, or, for a PEFT adapter folder, a copy of the base with the adapter merged in."""
    if isinstance(compare, nn.Module) or not (Path(str(compare)).expanduser() / "adapter_config.json").is_file():
        return compare
    import copy

    from rankwise.io.models import load_model
    from rankwise.tune.peft_backend import load_peft_adapter

    base = model if isinstance(model, nn.Module) else load_model(model)
    notes.append(f"--compare {compare} is an adapter folder: compared as its base with the adapter merged")
    return load_peft_adapter(copy.deepcopy(base), compare)


def _inspect(
    model: str | os.PathLike | nn.Module | None,
    cfg: InspectConfig,
    device: torch.device,
    on_progress: Callable[[int], None] | None,
) -> InspectReport:
    from rankwise.engine.device import dtype_name, stats_device
    from rankwise.progress import progress

    notes: list[str] = []
    src = _open(model, cfg, notes, targets=cfg.targets, exclude=cfg.exclude)
    src.check_finite()
    tuned: Source | None = None
    tuned_index: list[int] = []
    if cfg.compare is not None:
        tuned = _open(_compare_model(model, cfg.compare, notes), cfg, notes, include_heads=True)
        by_name = {r.name: i for i, r in enumerate(tuned.refs)}
        for r in src.refs:
            j = by_name.get(r.name)
            if j is None or tuned.refs[j].shape != r.shape:
                got = "missing" if j is None else f"shape {list(tuned.refs[j].shape)}"
                raise RankwiseError(
                    f"--compare model {tuned.label} does not match: {r.name} is {got} there, {list(r.shape)} "
                    "here; compare a model with its own fine-tuned (merged) version."
                )
            tuned_index.append(j)
        if isinstance(tuned, ModuleSource):
            for j, r in zip(tuned_index, src.refs):
                check_finite(tuned.load(j), r.name, tuned.label)

    # float64 work (Gram eigenvalues, singular vectors) runs where float64 is fast; svdvals on the device
    work = stats_device(device) if cfg.spectrum_method == "gram" else device
    f64 = stats_device(device)
    n = len(src.refs)
    rows: list[dict[str, Any] | None] = [None] * n
    svs: list[torch.Tensor | None] = [None] * n
    fits: dict[str, PowerLawFit] = {}
    spec_np: dict[str, np.ndarray] = {}
    seen_dtypes: set[str] = set()
    bar = progress(n, desc=f"inspecting {n} matrices", unit="matrix", enabled=cfg.progress)
    try:
        for batch in _batches(src.refs, cfg.max_batch_bytes):
            weights = []
            for i in batch:
                w = src.load(i)
                if src.streamed:
                    check_finite(w, src.refs[i].name, src.label)
                seen_dtypes.add(dtype_name(w.dtype))
                weights.append(w.to(work))
                del w
            batch_svs = batched_spectra(weights, method=cfg.spectrum_method, max_batch_bytes=cfg.max_batch_bytes
                                        or 1)
            for k, i in enumerate(batch):
                ref = src.refs[i]
                w = weights[k]
                s = batch_svs[k].cpu()
                svs[i] = s
                rows[i] = _row(ref.name, ref.shape, w, s, fits, spec_np, cfg)
                if cfg.farms:
                    ffit = fit_power_law(farms_eigenvalues(w, cfg.farms_side))
                    rows[i].update(alpha_farms=ffit.alpha, alpha_farms_xmin=ffit.xmin, alpha_farms_ks=ffit.ks)
                if tuned is not None:
                    w1 = tuned.load(tuned_index[i])
                    if tuned.streamed:
                        check_finite(w1, ref.name, tuned.label)
                    _compare_row(rows[i], w.to(f64), w1.to(f64), s, cfg)
                    del w1
                del w
            del weights, batch_svs
            src.release()
            if tuned is not None:
                tuned.release()
            bar.update(len(batch))
            if on_progress is not None:
                on_progress(len(batch))
    finally:
        bar.close()

    final_rows: list[dict[str, Any]] = rows  # type: ignore[assignment]
    threshold, welore_info = welore_classes(svs, [r.shape for r in src.refs], final_rows, cfg)  # type: ignore[arg-type]
    summary = summarise(final_rows, cfg, welore_info, compare=tuned is not None)
    if tuned is not None:
        summary["compare"] = str(cfg.compare if not isinstance(cfg.compare, nn.Module) else "module")
    settings: dict[str, Any] = {
        "device": str(device),
        "dtype": cfg.dtype if isinstance(cfg.dtype, str) else dtype_name(cfg.dtype),
        "weights_dtype": sorted(seen_dtypes),
        "threads": cfg.threads if cfg.threads else torch.get_num_threads(),
        "spectrum_method": cfg.spectrum_method,
        "streamed": src.streamed,
    }
    if tuned is not None:
        settings["compare_streamed"] = tuned.streamed
    if notes:
        settings["notes"] = notes
    return InspectReport(
        model=src.label,
        matrices=final_rows,
        summary=summary,
        spectra=spec_np,
        fits=fits,
        welore_threshold=threshold,
        config=cfg,
        settings=settings,
    )


def _row(name: str, shape: tuple[int, int], w: torch.Tensor, s: torch.Tensor, fits: dict[str, PowerLawFit],
         spec_np: dict[str, np.ndarray], cfg: InspectConfig) -> dict[str, Any]:
    """The per-matrix metrics (MATRIX_KEYS first, then additions) from the weight and its singular values."""
    m, n = shape
    s64 = s.double()
    fit = fit_power_law((s64**2).numpy())
    fits[name] = fit
    if cfg.keep_spectra:
        spec_np[name] = s64.numpy()
    return {
        "name": name,
        "shape": [m, n],
        "break_even_rank": break_even_rank(m, n),
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
        "type": layer_type(name),
        "layer": layer_index(name),
        "params": m * n,
        "spectral_norm": float(s64[0]) if len(s64) else 0.0,
        "frobenius_norm": float(s64.pow(2).sum().sqrt()),
        "alpha_n_tail": fit.n_tail,
    }


def _compare_row(row: dict[str, Any], w0: torch.Tensor, w1: torch.Tensor, s0: torch.Tensor,
                 cfg: InspectConfig) -> None:
    """Intruder dimensions, relative spectral and weight change of the tuned matrix ``w1`` against ``w0``."""
    s1 = batched_spectra([w1], method=cfg.spectrum_method)[0].cpu()
    s0d, s1d = s0.double(), s1.double()
    row["intruder_dimensions"] = intruder_count(w0, w1, cfg.intruder_top, cfg.intruder_eps)
    row["relative_spectral_change"] = float(
        torch.linalg.vector_norm(s1d - s0d) / torch.linalg.vector_norm(s0d).clamp_min(1e-300)
    )
    dw = torch.linalg.matrix_norm((w1 - w0).double())
    row["relative_weight_change"] = float(dw / torch.linalg.matrix_norm(w0.double()).clamp_min(1e-300))


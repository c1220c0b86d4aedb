"""``rankwise.compress``: one-shot low-rank compression of a trained model, in place.

Pipeline (methods.md §2–§3):

1. find the target matrices (every Linear/Conv1D except the LM head and tied layers);
2. collect calibration statistics through a ``forward_loop(model)`` (built from
   text, from token windows, or given by the user), block by block so memory
   stays bounded; with ``sequential=True`` block ℓ sees the outputs of the
   already-compressed blocks < ℓ;
3. allocate ranks (uniform / energy / welore / global) from the method's
   spectra under the parameter budget; matrices that would reach break-even
   stay dense;
4. factorise each matrix with the chosen method and swap in ``LowRankLinear``.

The result records the rank map, asked/achieved ratio, parameter counts and
timings, and ``model.rankwise_meta`` is set so ``rankwise.save`` writes it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.compression.allocation import NEEDS_SPECTRA, allocate, check_reachable
from rankwise.compression.calibration.blocks import (
    capture_block_inputs,
    find_blocks,
    initial_hiddens,
    run_block,
)
from rankwise.compression.calibration.loops import CalibInfo, text_windows, windows_forward_loop
from rankwise.compression.calibration.stats import LayerStats, StatsCollector
from rankwise.compression.methods import Method, MethodOptions, get_method
from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError, check_ratio
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.modules import set_module
from rankwise.surgery.targets import Target, find_targets


@dataclass
class CompressConfig:
    """Everything that defines a compression run. The defaults are the best pipeline we measured.

    ratio: fraction of the targeted parameters to remove, in (0, 1).
    method: ``svd``, ``asvd``, ``fwsvd`` or ``whiten``.
    alloc: ``uniform``, ``energy``, ``welore`` or ``global``.
    sequential: block ℓ's statistics come from the outputs of the compressed blocks < ℓ.
    calib / calib_samples / seq_len / seed: default calibration text (train split) and sampling.
    shrink / shrink_target: whiten only; C ← (1−λ)C + λ·T, T = diag(C) ("diag") or mean(diag C)·I ("identity").
    alloc_norm / min_rank_frac: global allocation's normalisation and rank floor (× uniform rank).
    alloc_sensitivity: ``fisher`` weights each matrix's σ² by its mean squared output gradient
        (loss units; from the first ``sens_samples`` calibration windows), ``none`` does not.
    skip_first: drop the first positions of each calibration sequence (BOS) from the statistics.
    targets / exclude: regexes over module names (default: all but LM head / tied layers).
    """

    ratio: float = 0.2
    method: str = "whiten"
    alloc: str = "global"
    sequential: bool = False
    calib: str = "ptb"
    calib_samples: int = 32
    seq_len: int = 256
    seed: int = 0
    shrink: float = 0.0
    shrink_target: str = "diag"
    alloc_norm: str = "none"
    alloc_sensitivity: str = "fisher"
    sens_samples: int = 8
    min_rank_frac: float = 0.0
    skip_first: int = 0
    asvd_alpha: float = 0.5
    jitter: float = 1e-6
    targets: str | None = None
    exclude: str | None = None
    batch_size: int = 8
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompressResult:
    """What a compression run did."""

    ranks: dict[str, int | None]  # None = kept dense
    asked_ratio: float
    achieved_ratio: float
    params_before: int
    params_after: int
    targeted_params_before: int
    targeted_params_after: int
    seconds: float
    method: str
    alloc: str
    sequential: bool
    calibration: dict | None
    timings: dict = field(default_factory=dict)
    break_even: dict[str, int] = field(default_factory=dict)

    @property
    def dense(self) -> list[str]:
        """Targeted matrices left dense (their rank would have reached break-even)."""
        return [k for k, v in self.ranks.items() if v is None]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense"] = self.dense
        return d


# -- calibration input ------------------------------------------------------------------------------


def _default_tokenizer(model: nn.Module):
    src = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    try:
        from transformers import AutoTokenizer

        from rankwise.io.models import resolve_model

        return AutoTokenizer.from_pretrained(str(resolve_model(src)))
    except Exception as exc:
        raise RankwiseError(
            f"cannot find a tokenizer for the model (config._name_or_path={src!r}); pass tokenizer=... "
            "or a forward_loop callable as calib."
        ) from exc


def resolve_calib(
    model: nn.Module, config: CompressConfig, calib: Any, tokenizer=None, with_loss: bool = False
) -> tuple[Callable[[nn.Module], Any], CalibInfo]:
    """Turn ``calib`` (None, a text spec, a LongTensor of windows, or a callable) into a forward loop."""
    if callable(calib) and not isinstance(calib, torch.Tensor):
        info = getattr(calib, "calib_info", None) or CalibInfo(text="<forward_loop>")
        return calib, info
    if isinstance(calib, torch.Tensor):
        from rankwise.io.texts import text_fingerprint

        loop = windows_forward_loop(calib, batch_size=config.batch_size, with_loss=with_loss)
        loop.windows = calib  # type: ignore[attr-defined]
        sha = text_fingerprint(",".join(map(str, calib.flatten().tolist())))
        return loop, CalibInfo(text="<token windows>", sha256=sha, samples=int(calib.shape[0]),
                               seq_len=int(calib.shape[1]), tokens=int(calib.numel()))
    spec = config.calib if calib is None else calib
    if not isinstance(spec, str):
        raise RankwiseError(
            f"calib must be a text name (ptb, bbc), a .txt path, a LongTensor of token windows or a "
            f"forward_loop(model) callable, not {type(calib).__name__}."
        )
    tok = tokenizer if tokenizer is not None else _default_tokenizer(model)
    windows, info = text_windows(tok, spec, config.calib_samples, config.seq_len, config.seed)
    loop = windows_forward_loop(windows, batch_size=config.batch_size, with_loss=with_loss)
    loop.windows = windows  # type: ignore[attr-defined]
    return loop, info


# -- helpers -----------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", disable=not enabled, leave=False)


def _replace(model: nn.Module, t: Target, B: torch.Tensor, A: torch.Tensor) -> LowRankLinear:
    w = t.module.weight
    layer = LowRankLinear.from_factors(
        B.to(w.device), A.to(w.device), t.bias, orig_kind="conv1d" if t.transposed else "linear", dtype=w.dtype
    )
    set_module(model, t.name, layer)
    return layer


class _Runner:
    """Walks the model block by block, collecting statistics and handing them to a callback."""

    def __init__(self, model: nn.Module, targets: list[Target], method: Method, config: CompressConfig,
                 loop: Callable[[nn.Module], Any], cache: dict | None = None) -> None:
        self.model, self.targets, self.method, self.config, self.loop = model, targets, method, config, loop
        self.cache = cache  # name -> LayerStats of the dense model (reused by non-sequential runs)
        self.blocks = find_blocks(model, targets)
        self._grad_stats: dict[str, LayerStats] | None = None

    def _collector(self, targets: list[Target]) -> StatsCollector:
        return StatsCollector(
            targets, want_xtx=self.method.needs_xtx, want_abs=self.method.needs_abs,
            skip_first=self.config.skip_first,
        )

    def grad_stats(self) -> dict[str, LayerStats]:
        """Squared-gradient row sums of every target from one full forward+backward pass (fwsvd)."""
        if self._grad_stats is None:
            targets = {id(t.module.weight) for t in self.targets}
            frozen = []
            for p in self.model.parameters():
                if id(p) not in targets and p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(p)
            try:
                with StatsCollector(self.targets, want_xtx=False, want_grad=True) as col:
                    self.loop(self.model)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            for t in self.targets:
                if col.stats[t.name].grad_sq is None:
                    raise RankwiseError(
                        "fwsvd needs gradients but the forward loop did not call backward(); pass text or token "
                        "windows as calib, or a forward_loop that computes a loss and calls loss.backward()."
                    )
            self._grad_stats = col.stats
        return self._grad_stats

    def walk(self, process: Callable[[list[Target], dict[str, LayerStats]], bool], sequential: bool,
             desc: str) -> None:
        """Call ``process(targets, stats)`` per block; ``process`` returns True if it replaced modules."""
        if self.method.needs_grad:
            stats = self.grad_stats()
            process(self.targets, stats)
            return
        if not self.method.needs_data:
            process(self.targets, {})
            return
        if not sequential and self.cache is not None and all(t.name in self.cache for t in self.targets):
            process(self.targets, self.cache)
            return
        inside = [t for t in self.targets if self.blocks is not None and t.name in self.blocks.index_of]
        outside = [t for t in self.targets if t not in inside]
        outside_stats: dict[str, LayerStats] = {}
        if outside:  # layers outside the repeated blocks (or a model without blocks): one full pass
            with self._collector(outside) as col, torch.no_grad():
                self.loop(self.model)
            outside_stats = col.stats
            self._check_seen(outside, outside_stats)
            if self.cache is not None:
                self.cache.update(outside_stats)
        if inside:
            assert self.blocks is not None
            inputs = capture_block_inputs(self.model, self.blocks.modules[0], self.loop)
            if not inputs:
                raise RankwiseError("the forward loop never reached the model's blocks; check the calib data.")
            hiddens = initial_hiddens(inputs)
            by_block: dict[int, list[Target]] = {}
            for t in inside:
                by_block.setdefault(self.blocks.index_of[t.name], []).append(t)
            with _progress(len(self.blocks.modules), desc, self.config.progress) as bar:
                for i, block in enumerate(self.blocks.modules):
                    tg = by_block.get(i, [])
                    with self._collector(tg) as col:
                        outs = run_block(block, inputs, hiddens)
                    changed = False
                    if tg:
                        self._check_seen(tg, col.stats)
                        if self.cache is not None and not sequential:
                            self.cache.update(col.stats)
                        changed = process(tg, col.stats)
                    del col
                    if sequential and changed and i + 1 < len(self.blocks.modules):
                        outs = run_block(block, inputs, hiddens)
                    hiddens = outs
                    bar.update(1)
            del inputs, hiddens
        if outside:
            process(outside, outside_stats)

    @staticmethod
    def _check_seen(targets: list[Target], stats: dict[str, LayerStats]) -> None:
        for t in targets:
            st = stats[t.name]
            if st.rows == 0:
                raise RankwiseError(
                    f"layer {t.name} received no calibration input; the forward loop must run the whole model."
                )
            bad = (st.xtx is not None and not bool(torch.isfinite(st.xtx).all())) or (
                st.abs_sum is not None and not bool(torch.isfinite(st.abs_sum).all()))
            if bad:
                raise RankwiseError(f"calibration statistics of {t.name} contain NaN/inf; check the model weights.")


def _options(config: CompressConfig) -> MethodOptions:
    return MethodOptions(asvd_alpha=config.asvd_alpha, shrink=config.shrink, shrink_target=config.shrink_target,
                         jitter=config.jitter)


def _count(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# -- the public entry point --------------------------------------------------------------------------


def compress(
    model: nn.Module,
    config: CompressConfig | None = None,
    calib: Any = None,
    tokenizer=None,
    stats_cache: dict | None = None,
    **overrides: Any,
) -> CompressResult:
    """Compress ``model`` in place (linear layers → ``LowRankLinear``) and return what was done.

    ``calib``: ``None`` (the config's text, train split), a text spec (``"ptb"``, ``"bbc"``,
    ``"ptb+bbc"``, a .txt path), a LongTensor of token windows (samples × seq_len), or a
    ``forward_loop(model)`` callable that runs the model on calibration data (for ``fwsvd``
    it must also call ``loss.backward()``). ``tokenizer`` defaults to the one in the model's
    source folder. Keyword ``overrides`` replace config fields (``compress(m, ratio=0.3)``).
    ``stats_cache``: a dict that keeps the dense model's statistics between non-sequential runs
    with the same method, calibration and model (benchmarks; costs memory: one XᵀX per matrix).
    """
    config = CompressConfig(**{**(asdict(config) if config else {}), **overrides})
    config.ratio = check_ratio(config.ratio)
    method = get_method(config.method)
    if config.alloc not in ("uniform", "energy", "welore", "global"):
        raise RankwiseError(f"unknown allocation {config.alloc!r}; choose one of uniform, energy, welore, global.")
    if not 0.0 <= config.shrink <= 1.0:
        raise RankwiseError(f"shrink must lie in [0, 1], got {config.shrink}.")
    if config.alloc_sensitivity not in ("none", "fisher"):
        raise RankwiseError(f"alloc_sensitivity must be 'none' or 'fisher', got {config.alloc_sensitivity!r}.")
    if config.shrink_target not in ("diag", "identity"):
        raise RankwiseError(f"shrink_target must be 'diag' or 'identity', got {config.shrink_target!r}.")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    targets = find_targets(model, config.targets, config.exclude)
    shapes = [t.shape for t in targets]
    check_reachable(shapes, config.ratio)
    params_before = _count(model)
    targeted_before = sum(m * n for m, n in shapes)
    opts = _options(config)

    info: CalibInfo | None = None
    loop: Callable[[nn.Module], Any] = lambda m: None  # noqa: E731
    wants_fisher = config.alloc_sensitivity == "fisher" and config.alloc in NEEDS_SPECTRA
    if method.needs_data or (wants_fisher and calib is not None):
        loop, info = resolve_calib(model, config, calib, tokenizer, with_loss=method.needs_grad)
    if wants_fisher and getattr(loop, "windows", None) is None:
        # no token windows to take gradients on (a user callable, or a data-free run without calib):
        # fall back to the scale-free relative-error normalisation
        warnings.warn(
            "alloc_sensitivity='fisher' needs text or token-window calibration; using alloc_norm='total' instead",
            stacklevel=2,
        )
        config.alloc_sensitivity, config.alloc_norm = "none", "total"
    timings["calibration_data"] = time.perf_counter() - t0

    was_training = model.training
    model.eval()
    runner = _Runner(model, targets, method, config, loop, cache=stats_cache)
    sequential = bool(config.sequential and method.needs_data and not method.needs_grad and runner.blocks)
    by_name = {t.name: t for t in targets}
    index = {t.name: i for i, t in enumerate(targets)}

    # 1. allocation
    t1 = time.perf_counter()
    energies: list[torch.Tensor | None] = [None] * len(targets)
    if config.alloc in NEEDS_SPECTRA:

        def spectra(tg: list[Target], stats: dict[str, LayerStats]) -> bool:
            for t in tg:
                p = method.prepare(t.weight(), stats.get(t.name), opts, name=t.name, vectors=False)
                energies[index[t.name]] = p.energy
            return False

        runner.walk(spectra, sequential=False, desc="calibrate + spectra")
    sensitivity = None
    if config.alloc_sensitivity == "fisher" and config.alloc in NEEDS_SPECTRA:
        from rankwise.compression.calibration.sensitivity import output_sensitivity

        windows = loop.windows[: config.sens_samples]  # type: ignore[attr-defined]

        def loss_loop(m: nn.Module) -> None:
            # one window per backward: bounded activation memory (a common scale does not move the allocation)
            from tqdm.auto import tqdm

            for i in tqdm(range(len(windows)), desc="loss sensitivity", unit="window", leave=False,
                          disable=not config.progress):
                windows_forward_loop(windows[i : i + 1], batch_size=1, with_loss=True)(m)

        sens = output_sensitivity(model, targets, loss_loop)
        sensitivity = [sens[t.name] for t in targets]
    alloc = allocate(
        config.alloc, shapes, config.ratio, energies=energies if config.alloc in NEEDS_SPECTRA else None,
        norm=config.alloc_norm, min_rank_frac=config.min_rank_frac, sensitivity=sensitivity,
    )
    rank_of = {t.name: r for t, r in zip(targets, alloc.ranks)}
    timings["allocation"] = time.perf_counter() - t1

    # 2. factorisation (sequential or not)
    t2 = time.perf_counter()

    def factorise(tg: list[Target], stats: dict[str, LayerStats]) -> bool:
        changed = False
        for t in tg:
            k = rank_of[t.name]
            if k is None:
                continue
            m, n = t.shape
            assert k < break_even_rank(m, n), f"{t.name}: rank {k} at/above break-even"
            p = method.prepare(t.weight(), stats.get(t.name), opts, name=t.name, vectors=True)
            B, A = p.factors(k)
            if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                raise RankwiseError(f"factorising {t.name} produced NaN/inf; check the weights and statistics.")
            _replace(model, by_name[t.name], B, A)
            changed = True
        return changed

    if config.alloc in NEEDS_SPECTRA and not sequential and method.needs_data:
        desc = "compress"
    else:
        desc = "calibrate + compress"
    with warnings.catch_warnings():
        if config.alloc in NEEDS_SPECTRA:  # the spectra pass already warned about the same matrices
            warnings.simplefilter("ignore", UserWarning)
        runner.walk(factorise, sequential=sequential, desc=desc)
    timings["factorisation"] = time.perf_counter() - t2
    if was_training:
        model.train()

    params_after = _count(model)
    ranks = {t.name: rank_of[t.name] for t in targets}
    targeted_after = sum(m * n if ranks[t.name] is None else ranks[t.name] * (m + n) for t, (m, n) in
                         zip(targets, shapes))
    seconds = time.perf_counter() - t0
    result = CompressResult(
        ranks=ranks,
        asked_ratio=config.ratio,
        achieved_ratio=1.0 - targeted_after / targeted_before,
        params_before=params_before,
        params_after=params_after,
        targeted_params_before=targeted_before,
        targeted_params_after=targeted_after,
        seconds=seconds,
        method=config.method,
        alloc=config.alloc,
        sequential=sequential,
        calibration=info.to_dict() if info else None,
        timings=timings,
        break_even={t.name: break_even_rank(*t.shape) for t in targets},
    )
    assert math.isclose(result.achieved_ratio, alloc.achieved_ratio, rel_tol=1e-9, abs_tol=1e-12)
    model.rankwise_meta = {
        "method": config.method,
        "allocation": config.alloc,
        "asked_ratio": config.ratio,
        "achieved_ratio": result.achieved_ratio,
        "sequential": sequential,
        "rank_per_matrix": ranks,
        "calibration": result.calibration,
        "config": config.to_dict(),
        "allocation_info": {k: v for k, v in alloc.info.items() if isinstance(v, (int, float, str))},
        "params_before": params_before,
        "params_after": params_after,
    }
    return result

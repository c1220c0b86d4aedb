"""``rankwise.compress``: one-shot low-rank compression of a trained model, in place.

Pipeline (docs/methods.md §2–§3), every calibration-driven stage through the one block runner
(:mod:`rankwise.compression.runner`):

1. find the target matrices (every Linear/Conv1D except the LM head and tied layers);
2. loss sensitivity of each matrix (default ``global`` allocation): a loss backward streamed
   block by block over the first ``sens_samples`` calibration windows;
3. calibration statistics block by block (each block on the work device, hidden states on the
   CPU); with ``sequential=True`` block ℓ sees the outputs of the already-compressed blocks < ℓ;
4. allocate ranks (uniform / energy / welore / global) from the method's spectra under the
   parameter budget; matrices that would reach break-even stay dense, and so do those whose rank
   would make them slower than dense (``speed_guard``, allocation/speed.py);
5. factorise each matrix with the chosen method and swap in ``LowRankLinear``.

The same pipeline streams a checkpoint folder block by block
(:func:`rankwise.compression.streaming.compress_checkpoint`); here the model is in memory and
is changed in place. The result records the rank map, asked/achieved ratio, parameter counts
and timings, and ``model.rankwise_meta`` is set so ``rankwise.save`` writes it.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from rankwise.compression.allocation import ALLOCATORS, NEEDS_SPECTRA, check_reachable
from rankwise.compression.allocation.greedy import NORMALISATIONS
from rankwise.compression.allocation.speed import SPEED_GUARDS, check_speed_guard, guarded_allocate
from rankwise.compression.anchor import CrossCollector, anchor_factors
from rankwise.compression.calibration.loops import CalibInfo, text_windows, windows_forward_loop
from rankwise.compression.calibration.sensitivity import OutputGradMeter, frozen, output_sensitivity
from rankwise.compression.calibration.stats import LayerStats, StatsCollector
from rankwise.compression.factor_store import FactorStore
from rankwise.compression.methods import METHODS, MethodOptions, get_method
from rankwise.compression.refine import refine_block
from rankwise.compression.runner import SPILL_BYTES, BlockRunner, Blocks, find_blocks
from rankwise.config import check_numbers
from rankwise.engine.device import (
    DTYPE_CHOICES,
    check_compute_dtype,
    compute_dtype,
    dtype_name,
    resolve_device,
    resolve_dtype,
    stats_device,
)
from rankwise.engine.metrics import break_even_rank
from rankwise.engine.threads import torch_threads
from rankwise.errors import RankwiseError, check_ratio
from rankwise.io.checkpoint import mark_factorised
from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.modules import set_module
from rankwise.surgery.targets import Target, find_targets

#: ``CompressConfig.method`` that picks the pipeline from the model (:func:`choose_method`)
AUTO = "auto"
#: ``method="auto"`` runs MoDeGPT from this ratio up: below it whiten + global allocation was better on validation
#: (SmolLM2, PTB valid / BBC valid × dense at ρ 0.1: whiten 1.08 / 1.18, MoDeGPT 1.18 / 1.25; at ρ 0.2: whiten
#: 1.41 / 1.72, MoDeGPT 1.38 / 1.60; the geometric means cross near ρ 0.16; docs/quality.md)
AUTO_MODEGPT_MIN_RATIO = 0.15
#: options only the whiten + global pipeline reads: with ``method="auto"`` setting one of them selects it
WHITEN_ONLY = ("anchor", "anchor_iters", "refine_steps", "shrink", "shrink_target", "alloc", "alloc_norm",
               "alloc_sensitivity", "sens_samples", "min_rank_frac")


def method_choices() -> tuple[str, ...]:
    """``auto`` and every registered factorisation method (the CLI's ``--method`` choices)."""
    return (AUTO, *METHODS.names())


def _f(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class CompressConfig:
    """Everything that defines a compression run. The defaults are the best pipeline we measured.

    Every field is checked in ``__post_init__`` (one-line :class:`RankwiseError`); the CLI builds its
    options from these fields, so a default is written once, here.
    """

    ratio: float = _f(0.2, "fraction of the targeted parameters to remove, in (0, 1)")
    method: str = _f("auto", "factorisation method; auto: modegpt where every block decomposes (q/k/v/o attention "
                     "and a gated MLP, all targeted, no whiten-only option set) and ratio ≥ 0.15, else whiten (the "
                     "choice and its reason are recorded in rankwise.json; chosen on PTB valid + BBC valid, "
                     "docs/quality.md)",
                     choices=method_choices)
    alloc: str = _f("global", "rank allocation", choices=ALLOCATORS.names)
    sequential: bool = _f(False, "calibrate block ℓ on the outputs of the compressed blocks < ℓ")
    anchor: bool = _f(False, "solve each B in closed form against the dense layer's outputs on the inputs the "
                      "compressed model feeds it (SVD-LLM V2 / AA-SVD); with --sequential this corrects the error "
                      "earlier blocks pass on (without it, it equals plain whitened truncation for whiten)")
    anchor_iters: int = _f(0, "anchor: alternating A/B least-squares updates after the closed-form B (0: B only)")
    refine_steps: int = _f(0, "Adam steps per block on its factors, matching the dense block's outputs "
                           "(0: no refinement)")
    refine_lr: float = _f(3e-5, "block refinement: Adam learning rate (3e-5: measured on PTB/BBC valid)")
    refine_holdout: float = _f(0.25, "block refinement: fraction of the calibration batches held out for early "
                               "stopping (the best state by held-out loss is kept), in (0, 1)")
    calib: str = _f("ptb+bbc", "calibration text, train split: ptb, bbc, a mixture like ptb+bbc or ptb:3+bbc:1, "
                    "or FILE.txt (the default was chosen on PTB valid + BBC valid, bench/calib_choice.py)")
    calib_samples: int = _f(32, "calibration windows")
    seq_len: int = _f(256, "tokens per calibration window")
    seed: int = _f(0, "calibration sampling seed")
    shrink: float = _f(0.0, "whiten: shrink XᵀX toward its target by this fraction, in [0, 1]")
    shrink_target: str = _f("diag", "whiten: shrink toward diag(XᵀX) or a scaled identity",
                            choices=("diag", "identity"))
    alloc_norm: str = _f("none", "global allocation: normalisation of each matrix's σ²",
                         choices=NORMALISATIONS)
    alloc_sensitivity: str = _f("fisher", "global allocation: weight each matrix's σ² by its mean squared output "
                                "gradient (loss units, from the first --sens-samples calibration windows)",
                                choices=("none", "fisher"))
    sens_samples: int = _f(8, "calibration windows of the loss-sensitivity pass")
    min_rank_frac: float = _f(0.0, "global allocation: no matrix below this fraction of the uniform rank, in [0, 1)")
    speed_guard: str = _f("auto", "no factorised layer slower than its dense one: a matrix whose rank would exceed its "
                          "speed break-even (layer cost model) stays dense; auto: applied unless the ratio is "
                          "unreachable within it (then a warning), strict: an error then, off: no guard",
                          choices=SPEED_GUARDS)
    speed_tokens: str = _f("1,512", "speed guard: tokens per call the layers must not be slower at "
                           "(1 = decode, 512 = prefill)")
    speed_cost: str = _f("builtin", "speed guard: layer cost model: builtin (cost_model.json, fitted on a CPU), "
                         "measure (fit on this machine now) or a FILE.json written by "
                         "python -m rankwise.evaluation.cost_model --fit on the machine the model will run on",
                         metavar="builtin|measure|FILE.json")
    skip_first: int = _f(0, "drop the first positions of each calibration window (BOS) from the statistics")
    asvd_alpha: float = _f(0.5, "asvd: column scaling exponent α")
    jitter: float = _f(1e-6, "whiten: relative diagonal jitter when XᵀX is singular")
    targets: str | None = _f(None, "regex of module names to compress (default: all linears but the LM head)")
    exclude: str | None = _f(None, "regex of module names to leave alone")
    batch_size: int = _f(8, "calibration windows per forward")
    device: str = _f("auto", "where blocks run: auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: str = _f("auto", "weights and factors are stored in this dtype (auto: the model's own)",
                    metavar="|".join(DTYPE_CHOICES))
    compute_dtype: str = _f("auto", "dtype the block being worked on is upcast to (auto: the storage dtype where the "
                            "device has fast kernels for it, else float32, e.g. bf16 on a CPU without "
                            "AVX512-BF16/AMX); factors are stored in --dtype", metavar="|".join(DTYPE_CHOICES))
    threads: int | None = _f(None, "torch intra-op threads (default: torch's own)")
    max_shard_size: str = _f("5GB", "largest safetensors shard of a streamed checkpoint (e.g. 5GB, 500MB)")
    heal_steps: int = _f(0, "healing after compression: optimizer steps of a LoRA on each factor (A, B), trained on "
                         "the calibration spec's train split and folded into the factors (ranks unchanged); 0: off")
    heal_rank: int = _f(8, "healing: LoRA rank per factor (capped at the factor's rank k)")
    heal_lr: float = _f(2e-4, "healing: AdamW learning rate (linear decay to zero)")
    heal_batch_size: int = _f(4, "healing: windows of --seq-len tokens per step")
    progress: bool = _f(True, "progress bars", cli=False)

    def __post_init__(self) -> None:
        check_numbers(self)  # the API bypasses the CLI's parsing: finite floats, whole 64-bit ints
        self.ratio = check_ratio(self.ratio)
        if self.method != AUTO:
            METHODS.check(self.method)
        ALLOCATORS.check(self.alloc)
        for name in ("shrink_target", "alloc_norm", "alloc_sensitivity", "speed_guard"):
            choices = next(f for f in fields(self) if f.name == name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise RankwiseError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")
        for name, low in (("calib_samples", 1), ("seq_len", 2), ("sens_samples", 1), ("batch_size", 1),
                          ("skip_first", 0), ("seed", 0), ("anchor_iters", 0), ("refine_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RankwiseError(f"{name} must be a whole number ≥ {low}, got {v!r}.")
        if self.skip_first >= self.seq_len:
            raise RankwiseError(f"skip_first ({self.skip_first}) must be below seq_len ({self.seq_len}).")
        check_speed_guard(self.speed_tokens, self.speed_cost)
        for name, lo, hi, closed in (("shrink", 0.0, 1.0, True), ("min_rank_frac", 0.0, 1.0, False),
                                     ("asvd_alpha", 0.0, 4.0, True), ("jitter", 0.0, 1.0, True)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and math.isfinite(v) and lo <= v and (v <= hi if closed else v < hi)
            if not ok:
                raise RankwiseError(f"{name} must lie in [{lo}, {hi}{']' if closed else ')'}, got {v!r}.")
        for name in ("refine_lr", "refine_holdout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v < 1):
                raise RankwiseError(f"{name} must lie in (0, 1), got {v!r}.")
        if self.anchor_iters and not self.anchor:
            raise RankwiseError("anchor_iters needs anchor=True (--anchor).")
        for name in ("targets", "exclude"):
            v = getattr(self, name)
            if v is not None:
                try:
                    re.compile(v)
                except re.error as exc:
                    raise RankwiseError(f"{name} {v!r} is not a valid regular expression ({exc}).") from None
        resolve_device(self.device)  # one line naming what is available
        resolve_dtype(self.dtype)
        check_compute_dtype(self.compute_dtype)
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise RankwiseError(f"threads must be a whole number ≥ 1, got {self.threads!r}.")
        from rankwise.io.shards import parse_size

        parse_size(self.max_shard_size)
        for name, low in (("heal_steps", 0), ("heal_rank", 1), ("heal_batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RankwiseError(f"{name} must be a whole number ≥ {low}"
                                    f"{' (0: no healing)' if name == 'heal_steps' else ''}, got {v!r}.")
        if isinstance(self.heal_lr, bool) or not isinstance(self.heal_lr, (int, float)) or not (
                math.isfinite(self.heal_lr) and self.heal_lr > 0):
            raise RankwiseError(f"heal_lr must be a positive number, got {self.heal_lr!r}.")
        from rankwise.compression.calibration.loops import parse_mixture

        parse_mixture(self.calib, self.calib_samples)  # unknown text, bad weight, empty part: one line, before any work

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
    healing: dict | None = None  # HealResult.to_dict() when heal_steps > 0
    method_choice: str | None = None  # method="auto": what it chose and why

    @property
    def dense(self) -> list[str]:
        """Targeted matrices left dense (their rank would have reached break-even)."""
        return [k for k, v in self.ranks.items() if v is None]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense"] = self.dense
        return d


def choose_method(model: nn.Module, targets: list[Target], config: CompressConfig) -> tuple[CompressConfig, str | None]:
    """Resolve ``method="auto"``: MoDeGPT where it can decompose every block, whiten + global allocation otherwise.

    MoDeGPT was better than whiten + global on PTB valid and BBC valid at ρ 0.2–0.5 on SmolLM2
    (docs/quality.md) and whiten at ρ 0.1, so ratios below :data:`AUTO_MODEGPT_MIN_RATIO` select whiten. MoDeGPT
    also needs separate q/k/v/o projections, a gated MLP and whole blocks: GPT-2's fused
    ``c_attn``, per-head q/k norms, ``--targets``/``--exclude``, ``--heal-steps`` (it makes no factors) or any
    whiten-only option (:data:`WHITEN_ONLY`) select whiten. Returns the config with the method it chose and a
    one-line reason (None when the method was not ``auto``). Structure only: no data is read.
    """
    if config.method != AUTO:
        return config, None
    defaults = {f.name: f.default for f in fields(CompressConfig)}
    given = [n for n in WHITEN_ONLY if getattr(config, n) != defaults[n]]
    if given:
        reason = f"--{given[0].replace('_', '-')} is an option of the whiten pipeline"
    elif config.ratio < AUTO_MODEGPT_MIN_RATIO:
        reason = (f"ratio {config.ratio} < {AUTO_MODEGPT_MIN_RATIO}, where whiten + global allocation was better on "
                  "validation text")
    else:
        from rankwise.compression.modegpt import allocate_sparsity, plan_modegpt

        try:
            _, layouts, fixed = plan_modegpt(model, targets, config, has_data=True)
            allocate_sparsity([0.0] * len(layouts), layouts, config.ratio, fixed)  # the ratio is within its caps
        except RankwiseError as exc:
            reason = str(exc)
        else:
            return replace(config, method="modegpt"), (
                f"auto → modegpt: all {len(layouts)} blocks have q/k/v/o attention and a gated MLP")
    return replace(config, method="whiten"), f"auto → whiten: {reason}"


# -- calibration input ------------------------------------------------------------------------------


def _default_tokenizer(model: nn.Module, why: str = "text calibration"):
    src = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    try:
        from transformers import AutoTokenizer

        from rankwise.io.models import resolve_model

        return AutoTokenizer.from_pretrained(str(resolve_model(src)))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RankwiseError(
            f"{why} needs a tokenizer and none was found for the model (config._name_or_path={src!r}); "
            "pass tokenizer=... (or token windows as calib)."
        ) from exc


def _check_windows(model: nn.Module, ids: torch.Tensor) -> None:
    """Token windows must be a non-empty 2-D integer tensor of ids inside the model's vocabulary."""
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise RankwiseError(f"calib token windows must be a non-empty 2-D LongTensor (windows × seq_len), got "
                            f"shape {tuple(ids.shape)}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise RankwiseError(f"calib token windows must hold integer ids, got {ids.dtype}.")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise RankwiseError(f"calib token ids must lie in [0, {vocab}) (the model's vocabulary), got {lo}..{hi}; "
                            "tokenize with the model's own tokenizer.")


def resolve_calib(
    model: nn.Module, config: CompressConfig, calib: Any, tokenizer=None, with_loss: bool = False
) -> tuple[Callable[[nn.Module], Any], CalibInfo]:
    """Turn ``calib`` (None, a text spec, a LongTensor of windows, or a callable) into a forward loop.

    A loop built from windows carries them as ``loop.windows`` (the runner's streamed backward
    passes and the distributed sharding use them).
    """
    if callable(calib) and not isinstance(calib, torch.Tensor):
        info = getattr(calib, "calib_info", None) or CalibInfo(text="<forward_loop>")
        return calib, info
    if isinstance(calib, torch.Tensor):
        from rankwise.io.texts import text_fingerprint

        _check_windows(model, calib)
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


def _dist(device: torch.device | None = None):
    from rankwise.compression.distributed import Dist

    return Dist.current(device)


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` decided: the rank map, the allocation and the stage timings."""

    rank_of: dict[str, int | None]
    alloc: Any
    sequential: bool
    timings: dict[str, float]
    sensitivity: dict[str, float] | None = None
    refine: dict[str, dict] | None = None  # block index -> RefineInfo.to_dict() (refine_steps > 0)
    targeted_after: int | None = None  # targeted weights left, when not rank·(m+n) per matrix (modegpt)


def run_pipeline(
    model: nn.Module,
    targets: list[Target],
    config: CompressConfig,
    *,
    device: torch.device,
    loop: Callable[[nn.Module], Any] | None,
    sens_windows: torch.Tensor | None,
    load: Callable[[int, nn.Module], None] | None = None,
    release: Callable[[int, nn.Module], None] | None = None,
    on_block_done: Callable[[int, nn.Module], None] | None = None,
    cache: dict | None = None,
    spill_bytes: int = SPILL_BYTES,
    runners: list | None = None,
    head_scope: Callable[[], contextlib.AbstractContextManager] | None = None,
    keep_factors: bool = True,
) -> PipelineResult:
    """Sensitivity → statistics + spectra → allocation → factorisation, block by block.

    Shared by the in-memory :func:`compress` (``load``/``release`` move a block to ``device`` and
    back) and the streamed :func:`rankwise.compression.streaming.compress_checkpoint` (they read a
    block from safetensors and put it back on the meta device; ``on_block_done(i, block)`` writes
    block ``i`` once it is factorised). ``loop``: the calibration forward loop (None for a data-free
    method); ``sens_windows``: token windows of the loss-sensitivity pass (None: no sensitivity).
    ``runners``: if a list, every :class:`BlockRunner` made is appended (tests count materialised blocks).
    ``head_scope()``: a context entered around the passes that run the model's head (loss sensitivity, fwsvd
    gradients); the streamed compress upcasts a head it keeps in the storage dtype there.
    ``keep_factors``: let the spectra pass keep factors on disk for the factorisation pass where that gives the
    same result (False: recompute them; tests compare the two).
    """
    config, _ = choose_method(model, targets, config)  # callers that did not resolve method="auto" yet
    method = get_method(config.method)
    structured = getattr(method, "run_pipeline", None)
    if structured is not None:  # a method that rewrites whole blocks (modegpt) runs its own stages
        return structured(model, targets, config, device=device, loop=loop, load=load, release=release,
                          on_block_done=on_block_done, spill_bytes=spill_bytes, runners=runners)
    dist = _dist(device)
    opts = _options(config)
    sdev = stats_device(device)
    timings: dict[str, float] = {}
    shapes = [t.shape for t in targets]
    index = {t.name: i for i, t in enumerate(targets)}
    blocks = find_blocks(model, targets)
    by_block = blocks.targets_of(targets) if blocks is not None else {}
    inside = {t.name for tg in by_block.values() for t in tg}
    outside = [t for t in targets if t.name not in inside]
    if outside and load is not None:
        raise RankwiseError(
            f"{outside[0].name} lies outside the model's repeated blocks, which a streamed compress cannot "
            "reach; leave it out with --exclude, or compress the model in memory (rankwise.compress)."
        )
    has_windows = getattr(loop, "windows", None) is not None

    def runner(run_loop, progress: bool = config.progress) -> BlockRunner:
        if blocks is None:
            raise RuntimeError("rankwise bug: a block runner was asked for a model without decoder blocks")
        r = BlockRunner(model, blocks, run_loop, device=device, load=load, release=release,
                        spill_bytes=spill_bytes, progress=progress)
        if runners is not None:
            runners.append(r)
        return r

    def collector(tg: list[Target], **kw) -> StatsCollector:
        return StatsCollector(tg, want_xtx=kw.get("want_xtx", method.needs_xtx or config.anchor), want_abs=kw.get(
            "want_abs", method.needs_abs), want_grad=kw.get("want_grad", False), skip_first=config.skip_first,
            stats_device=sdev)

    def head_loss_fn(r: BlockRunner, windows: torch.Tensor, batch: int) -> Callable[[int, torch.Tensor], Any]:
        def head_loss(b: int, h: torch.Tensor) -> torch.Tensor:
            x = windows[b * batch : (b + 1) * batch].to(device)
            out = r.head_pass(lambda: model(input_ids=x, labels=x, use_cache=False), h)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise RankwiseError(
                    "the loss-sensitivity and fwsvd passes need a model that computes a loss from labels (a causal "
                    "LM); use alloc_sensitivity='none' or another method."
                )
            return loss

        return head_loss

    # 1. loss sensitivity (streamed backward, one window per backward)
    t0 = time.perf_counter()
    sensitivity: dict[str, float] | None = None
    if sens_windows is not None:
        meter = OutputGradMeter(targets)
        if blocks is None:
            def loss_loop(m: nn.Module) -> None:
                for i in range(len(sens_windows)):
                    windows_forward_loop(sens_windows[i : i + 1], batch_size=1, with_loss=True)(m)

            sensitivity = output_sensitivity(model, targets, loss_loop)
        else:
            r = runner(windows_forward_loop(sens_windows, batch_size=1))
            with r, frozen(model), meter.hooks(outside), (head_scope or contextlib.nullcontext)():
                r.backward(head_loss_fn(r, sens_windows, 1),
                           collect=lambda i: meter.hooks(by_block.get(i, [])), desc="loss sensitivity")
            dist.all_reduce_(meter.sums)
            dist.all_reduce_(meter.counts)
            sensitivity = meter.result()
    timings["sensitivity"] = time.perf_counter() - t0

    # 2. gradient statistics (fwsvd): the same streamed backward over the calibration batches
    grad_stats: dict[str, LayerStats] | None = None
    if method.needs_grad:
        t0 = time.perf_counter()
        if has_windows and blocks is not None and not outside:
            windows = loop.windows  # type: ignore[union-attr]
            r = runner(windows_forward_loop(windows, batch_size=config.batch_size))
            grad_stats = {}
            cols: dict[int, StatsCollector] = {}

            def grad_collect(i: int) -> StatsCollector:
                cols[i] = collector(by_block.get(i, []), want_xtx=False, want_abs=False, want_grad=True)
                return cols[i]

            with r, frozen(model), (head_scope or contextlib.nullcontext)():
                r.backward(head_loss_fn(r, windows, config.batch_size), collect=grad_collect, desc="fwsvd gradients")
            for col in cols.values():
                grad_stats.update(col.stats)
        elif load is None:  # a user forward loop (or no blocks): the loop's own backward on the whole model
            if loop is None:
                raise RuntimeError("rankwise bug: gradient statistics without a calibration loop")
            with frozen(model), collector(targets, want_xtx=False, want_abs=False, want_grad=True) as col:
                loop(model)
            grad_stats = col.stats
        else:
            raise RankwiseError("fwsvd on a streamed checkpoint needs text or token-window calibration.")
        dist.all_reduce_stats(grad_stats)
        for t in targets:
            if grad_stats[t.name].grad_sq is None:
                raise RankwiseError(
                    "fwsvd needs gradients but the forward loop did not call backward(); pass text or token "
                    "windows as calib, or a forward_loop that computes a loss and calls loss.backward()."
                )
        timings["gradients"] = time.perf_counter() - t0

    sequential = bool(config.sequential and method.needs_data and not method.needs_grad and blocks is not None)
    data_walk = method.needs_data and not method.needs_grad
    if (config.anchor or config.refine_steps) and not (data_walk and loop is not None):
        raise RankwiseError(f"anchor and refine_steps need the calibration statistics of a data walk, which method "
                            f"{config.method!r} does not make; use whiten or asvd.")
    if config.refine_steps and blocks is None:
        raise RankwiseError("refine_steps refines decoder blocks, and this model has no repeated blocks holding the "
                            "targeted layers; leave refine_steps at 0.")
    anchor_cross: dict[str, torch.Tensor] = {}  # C = X_dᵀX_c of the block being factorised (sequential + anchor)

    def walk(process: Callable[[list[Target], dict[str, LayerStats]], bool], seq: bool, desc: str,
             done: Callable[[int, nn.Module], None] | None = None,
             post: Callable[[BlockRunner, int, nn.Module], None] | None = None, need_data: bool = True) -> None:
        """``process(targets, stats)`` per block, then once for targets outside the blocks; ``done(i, block)``.

        ``post(runner, i, block)`` runs after a block was changed, before ``done`` (block refinement);
        it needs the block's inputs and the dense teacher's outputs, so the walk then carries data.
        """
        outside_stats: dict[str, LayerStats] = {}
        if outside and need_data:
            if data_walk and not (cache is not None and all(t.name in cache for t in outside)):
                if loop is None:
                    raise RuntimeError("rankwise bug: a data walk without a calibration loop")
                with collector(outside) as col, torch.no_grad():
                    loop(model)
                dist.all_reduce_stats(col.stats)
                _check_seen(outside, col.stats)
                outside_stats = col.stats
                if cache is not None:
                    cache.update(outside_stats)
            elif grad_stats is not None:
                outside_stats = grad_stats
            elif cache is not None:
                outside_stats = cache
        if blocks is not None:
            cached = cache is not None and not seq and post is None and all(t.name in cache for t in by_block_all)
            use_data = data_walk and not cached and need_data
            r = runner(loop if use_data else None)
            current: dict[str, Any] = {}
            # the dense teacher stream: anchoring and refinement target the dense model's outputs
            teacher = seq and (config.anchor or post is not None)

            def collect(i: int) -> StatsCollector:
                current["col"] = collector(by_block.get(i, []))
                return current["col"]

            def pair(i: int) -> CrossCollector:
                current["cross"] = CrossCollector(by_block.get(i, []), skip_first=config.skip_first,
                                                  stats_device=sdev)
                return current["cross"]

            def visit(i: int, block: nn.Module) -> bool:
                tg = by_block.get(i, [])
                if not tg:
                    changed = False
                elif use_data:
                    stats = current.pop("col").stats
                    dist.all_reduce_stats(stats)
                    _check_seen(tg, stats)
                    if cache is not None and not seq:
                        cache.update(stats)
                    cross = current.pop("cross", None)
                    anchor_cross.clear()
                    if cross is not None:
                        for c in cross.unique():
                            dist.all_reduce_(c)
                        anchor_cross.update(cross.cross)
                    changed = process(tg, stats)
                    anchor_cross.clear()
                else:
                    changed = process(tg, grad_stats if grad_stats is not None else (cache or {}))
                if changed and post is not None:
                    post(r, i, block)
                if done is not None:
                    done(i, block)
                return changed

            with r:
                r.walk(visit, collect=collect, sequential=seq, with_data=use_data, desc=desc, teacher=teacher,
                       pair=pair if teacher and config.anchor else None)
        if outside:
            process(outside, outside_stats)

    by_block_all = [t for tg in by_block.values() for t in tg]

    # 3. spectra + allocation. When the factorisation pass would only repeat the same statistics and
    # decompositions (not sequential, no anchoring or refinement, one process), the spectra pass keeps every
    # matrix's factors up to its cap rank on disk and the factorisation pass slices them (factor_store.py).
    t1 = time.perf_counter()
    energies: list[torch.Tensor | None] = [None] * len(targets)
    store = FactorStore() if (config.alloc in NEEDS_SPECTRA and keep_factors and not sequential and not config.anchor
                              and not config.refine_steps and not dist.enabled and FactorStore.fits(shapes)) else None
    if config.alloc in NEEDS_SPECTRA:

        def spectra(tg: list[Target], stats: dict[str, LayerStats]) -> bool:
            for i, t in enumerate(tg):
                st = stats.get(t.name)
                if store is not None and cache is None and st is not None and st.xtx is not None and not any(
                        (o := stats.get(u.name)) is not None and o.xtx is st.xtx for u in tg[i + 1:]):
                    st.extra["consumable"] = True  # the last reader of these statistics: factorise them in place
                p = method.prepare(t.weight().to(sdev), st, opts, name=t.name, vectors=store is not None)
                energies[index[t.name]] = p.energy.cpu()
                if store is not None and (kcap := FactorStore.cap(*t.shape)) >= 1:
                    store.put(t.name, *p.factors(kcap))
                del p
            return False

        walk(spectra, seq=False, desc="calibrate + spectra")  # blocks are written by the factorisation pass only
    alloc = guarded_allocate(
        config.alloc, shapes, config.ratio, energies=energies if config.alloc in NEEDS_SPECTRA else None,
        guard=config.speed_guard, tokens=config.speed_tokens, cost=config.speed_cost,
        norm=config.alloc_norm, min_rank_frac=config.min_rank_frac,
        sensitivity=[sensitivity[t.name] for t in targets] if sensitivity is not None else None,
    )
    rank_of = {t.name: r for t, r in zip(targets, alloc.ranks)}
    timings["allocation"] = time.perf_counter() - t1

    # 4. factorisation (sequential or not); the factorisations of a block are shared out among processes
    t2 = time.perf_counter()

    def factorise(tg: list[Target], stats: dict[str, LayerStats]) -> bool:
        by_name = {t.name: t for t in tg}

        def one(name: str) -> dict:
            t = by_name[name]
            k = rank_of[name]
            if k is None:  # dense matrices are filtered out before factorisation
                raise RuntimeError(f"rankwise bug: {name} reached factorisation without a rank")
            if k >= break_even_rank(*t.shape):
                raise RankwiseError(f"{name}: rank {k} at/above break-even")  # allocators never do this
            if store is not None:  # the spectra pass's factors, sliced to rank k (float32 already)
                B, A = store.get(name, k)
                if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                    raise RankwiseError(f"factorising {name} produced NaN/inf; check the weights and statistics.")
                return {"B": B, "A": A}
            W = t.weight().to(sdev)
            p = method.prepare(W, stats.get(name), opts, name=name, vectors=True)
            B, A = p.factors(k)
            if config.anchor:  # B (and A) against the dense outputs (docs/methods.md §3, output anchoring)
                st = stats.get(name)
                if st is None or st.xtx is None:
                    raise RankwiseError(f"anchor needs the input statistics XᵀX of {name}, which were not collected "
                                        "(a statistics cache from a run without anchor?).")
                B, A = anchor_factors(W, B, A, st.xtx, anchor_cross.get(name), iters=config.anchor_iters)
            if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                raise RankwiseError(f"factorising {name} produced NaN/inf; check the weights and statistics.")
            # factors in float32 (or wider), stored in the model's dtype on the device
            return {"B": B.to(torch.float32), "A": A.to(torch.float32)}

        names = [t.name for t in tg if rank_of[t.name] is not None]
        done = dist.map_shared(names, one)
        for name in names:
            t = by_name[name]
            w = t.module.weight
            layer = LowRankLinear.from_factors(
                done[name]["B"].to(w.device), done[name]["A"].to(w.device), t.bias,
                orig_kind="conv1d" if t.transposed else "linear", dtype=w.dtype,
            )
            set_module(model, name, layer)
            # the replaced Linear stays referenced by its Target until the run ends: free its weight now, or a
            # streamed run keeps every block's dense weights (measured: +0.12 GB per 1536/6144 block)
            if not t.module.weight.is_meta:
                t.module._parameters["weight"] = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)
        return bool(names)

    refined: dict[str, dict] = {}
    refine_seconds = [0.0]

    def refine(r: BlockRunner, i: int, block: nn.Module) -> None:
        t = time.perf_counter()
        info = refine_block(r, i, block, steps=config.refine_steps, lr=config.refine_lr,
                            holdout=config.refine_holdout, skip_first=config.skip_first, dist=dist)
        if info is not None:
            refined[str(i)] = info.to_dict()
        refine_seconds[0] += time.perf_counter() - t

    desc = "compress" if config.alloc in NEEDS_SPECTRA and not sequential and data_walk else "calibrate + compress"
    if store is not None:
        desc = "write factors"
    try:
        with warnings.catch_warnings():
            if config.alloc in NEEDS_SPECTRA:  # the spectra pass already warned about the same matrices
                warnings.simplefilter("ignore", UserWarning)
            walk(factorise, seq=sequential, desc=desc, done=on_block_done,
                 post=refine if config.refine_steps > 0 else None, need_data=store is None)
    finally:
        if store is not None:
            store.close()
    timings["factorisation"] = time.perf_counter() - t2
    if config.refine_steps > 0:
        timings["refine"] = refine_seconds[0]  # part of the factorisation pass
    return PipelineResult(rank_of=rank_of, alloc=alloc, sequential=sequential, timings=timings,
                          sensitivity=sensitivity, refine=refined or None)


def sensitivity_windows(
    model: nn.Module, config: CompressConfig, loop: Callable[[nn.Module], Any] | None, tokenizer=None
) -> tuple[torch.Tensor | None, CalibInfo | None]:
    """Token windows of the loss-sensitivity pass, or (None, None) when the allocation needs none.

    The calibration windows when there are some; otherwise (a data-free method, or a user
    forward_loop) windows of ``config.calib`` (no silent switch to another normalisation: without a
    tokenizer this is a one-line error).
    """
    if not (config.alloc_sensitivity == "fisher" and config.alloc in NEEDS_SPECTRA):
        return None, None
    windows = getattr(loop, "windows", None)
    if windows is not None:
        return windows[: config.sens_samples], None
    tok = tokenizer if tokenizer is not None else _default_tokenizer(
        model, why="alloc_sensitivity='fisher' (the default global allocation) without token windows")
    windows, info = text_windows(tok, config.calib, config.sens_samples, config.seq_len, config.seed)
    return windows, info


def _move_outside_blocks(model: nn.Module, blocks: Blocks | None, device: torch.device) -> dict:
    """Move every parameter and buffer outside the repeated blocks to ``device``; returns where they were."""
    pre = (blocks.prefix + ".") if blocks is not None else None
    home: dict = {}
    for mname, mod in model.named_modules():
        if pre is not None and (mname + ".").startswith(pre):
            continue
        for key, p in list(mod._parameters.items()):
            if p is not None and p.device != device:
                home[(mod, key, "p")] = p.device
                p.data = p.data.to(device)
        for key, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                home[(mod, key, "b")] = b.device
                mod._buffers[key] = b.to(device)
    return home


def _move_back(home: dict) -> None:
    for (mod, key, kind), dev in home.items():
        if kind == "p" and mod._parameters.get(key) is not None:
            p = mod._parameters[key]
            p.data = p.data.to(dev)
        elif kind == "b" and mod._buffers.get(key) is not None:
            mod._buffers[key] = mod._buffers[key].to(dev)


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


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
    Blocks run one at a time on ``config.device``; the rest of the model moves there for the run.
    """
    if config is not None and not isinstance(config, CompressConfig):
        raise RankwiseError(f"compress takes a CompressConfig, got {type(config).__name__}; "
                            "build one with rankwise.CompressConfig(...).")
    config = CompressConfig(**{**(asdict(config) if config else {}), **overrides})
    t0 = time.perf_counter()
    device = _dist(resolve_device(config.device)).device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, _model_dtype(model))
    compute = compute_dtype(device, dtype, config.compute_dtype)
    with torch_threads(config.threads):
        if _model_dtype(model) != dtype:
            model.to(dtype)
        targets = find_targets(model, config.targets, config.exclude)
        for t in targets:  # NaN/Inf would only surface later as an SVD failure far from its cause
            w = t.weight()
            if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
                raise RankwiseError(f"weight {t.name} holds {int((~torch.isfinite(w)).sum())} NaN/Inf value(s); "
                                    "the model is broken, re-save or re-download it.")
        shapes = [t.shape for t in targets]
        check_reachable(shapes, config.ratio)
        config, choice = choose_method(model, targets, config)
        params_before = _count(model)
        targeted_before = sum(m * n for m, n in shapes)
        method = get_method(config.method)
        dist = _dist(device)

        info: CalibInfo | None = None
        loop: Callable[[nn.Module], Any] | None = None
        if method.needs_data:
            loop, info = resolve_calib(model, config, calib, tokenizer, with_loss=method.needs_grad)
        elif calib is not None and config.alloc_sensitivity == "fisher" and config.alloc in NEEDS_SPECTRA:
            loop, info = resolve_calib(model, config, calib, tokenizer)  # data-free method: windows for sensitivity
        sens_windows, sens_info = sensitivity_windows(model, config, loop, tokenizer)
        if dist.enabled:  # each process takes its share of the windows one process would use (info: all of them)
            if sens_windows is not None:  # the first sens_samples of *all* windows, then shared out
                sens_windows = dist.shard_windows(sens_windows)
            if method.needs_data and getattr(loop, "windows", None) is not None:
                loop, _ = resolve_calib(model, config, dist.shard_windows(loop.windows, config.batch_size),
                                        with_loss=method.needs_grad)
        if not method.needs_data:
            loop = None
        timings: dict[str, float] = {"calibration_data": time.perf_counter() - t0}

        was_training = model.training
        model.eval()
        # in memory the whole model is upcast for the run (user forward loops and targets outside the blocks run
        # the whole model); a streamed checkpoint (streaming.compress_checkpoint) upcasts one block at a time
        if compute != dtype:
            model.to(compute)
        home = _move_outside_blocks(model, find_blocks(model, targets), device)
        try:
            out = run_pipeline(model, targets, config, device=device, loop=loop, sens_windows=sens_windows,
                               cache=stats_cache)
        finally:
            _move_back(home)
            if compute != dtype:
                model.to(dtype)  # factors computed in ``compute``, stored in ``dtype``
            if was_training:
                model.train()
    timings.update(out.timings)
    healing = None
    if config.heal_steps:  # healing (compression/heal.py): a LoRA on each factor, folded back; ranks unchanged
        from rankwise.compression.heal import heal

        t3 = time.perf_counter()
        windows = calib if isinstance(calib, torch.Tensor) else None
        heal_cfg = replace(config, calib=calib) if isinstance(calib, str) else config
        tok = tokenizer if tokenizer is not None or windows is not None else _default_tokenizer(model, "healing")
        with torch_threads(config.threads):
            healing = heal(model, heal_cfg, tokenizer=tok, windows=windows).to_dict()
        timings["healing"] = time.perf_counter() - t3
    params_after = _count(model)
    ranks = {t.name: out.rank_of[t.name] for t in targets}
    targeted_after = out.targeted_after if out.targeted_after is not None else sum(
        m * n if ranks[t.name] is None else ranks[t.name] * (m + n) for t, (m, n) in zip(targets, shapes))
    calibration = info.to_dict() if info else None
    if sens_info is not None:
        calibration = {**(calibration or {}), "sensitivity": sens_info.to_dict()}
    result = CompressResult(
        ranks=ranks,
        asked_ratio=config.ratio,
        achieved_ratio=1.0 - targeted_after / targeted_before,
        params_before=params_before,
        params_after=params_after,
        targeted_params_before=targeted_before,
        targeted_params_after=targeted_after,
        seconds=time.perf_counter() - t0,
        method=config.method,
        alloc=config.alloc,
        sequential=out.sequential,
        calibration=calibration,
        timings=timings,
        break_even={t.name: break_even_rank(*t.shape) for t in targets},
        healing=healing,
        method_choice=choice,
    )
    if not math.isclose(result.achieved_ratio, out.alloc.achieved_ratio, rel_tol=1e-9, abs_tol=1e-12):
        raise RuntimeError("the rank map and the allocation disagree on the achieved ratio")  # a bug, not user error
    model.rankwise_meta = build_meta(config, out, result, params_before, params_after, device, dtype, compute)
    mark_factorised(model)  # quantization_config: save_pretrained writes a folder from_pretrained rebuilds
    return result


def build_meta(config: CompressConfig, out: PipelineResult, result: CompressResult, params_before: int,
               params_after: int, device: torch.device, dtype: torch.dtype,
               compute: torch.dtype | None = None) -> dict:
    """What ``rankwise.json`` records about a compression run."""
    return {
        "method": config.method,
        "allocation": config.alloc,
        "asked_ratio": config.ratio,
        "achieved_ratio": result.achieved_ratio,
        "sequential": out.sequential,
        "rank_per_matrix": result.ranks,
        "calibration": result.calibration,
        "config": config.to_dict(),
        "allocation_info": {k: v for k, v in out.alloc.info.items() if isinstance(v, (int, float, str))},
        "params_before": params_before,
        "params_after": params_after,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "compute_dtype": dtype_name(compute if compute is not None else dtype),
        "torch_threads": torch.get_num_threads(),
        "timings": result.timings,
        **({"refine": out.refine} if out.refine else {}),
        **({"healing": result.healing} if result.healing else {}),
        **({"method_choice": result.method_choice} if result.method_choice else {}),
    }

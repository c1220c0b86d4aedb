"""``rankwise.quantize``: low-bit weights (RTN or GPTQ) with optional EoRA low-rank compensation, in place.

Pipeline:

1. find the target matrices (every Linear/Conv1D except the LM head and tied layers; the
   two factors of every ``LowRankLinear`` of a ``rankwise compress`` output; the kept
   rows × columns block of every MoDeGPT ``SelectLinear`` of a ``--method modegpt`` output);
2. RTN needs no data. GPTQ and EoRA need each layer's input second moment XᵀX (float64,
   the same statistics whitening uses): the block runner walks the calibration text block
   by block; with ``sequential`` (the default) block ℓ's statistics come from the outputs of
   the already-quantised blocks < ℓ;
3. each matrix is quantised (:func:`~rankwise.quantization.rtn.rtn` or
   :func:`~rankwise.quantization.gptq.gptq`) and replaced by a :class:`QuantLinear` holding
   packed codes; with ``eora_rank`` the rank-r EoRA correction of its error
   (:func:`rankwise.compression.eora.eora_factors`, from the same XᵀX) is stored beside it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.config import check_int, check_numbers
from rankwise.errors import RankwiseError
from rankwise.progress import progress as progress_bar
from rankwise.quantization.gptq import gptq
from rankwise.quantization.layer import QuantLinear, QuantLowRank, QuantSelect
from rankwise.quantization.pack import SUPPORTED_BITS, check_bits
from rankwise.quantization.rtn import QuantizedWeight, rtn
from rankwise.registry import Registry

__all__ = ["METHODS", "QuantizeConfig", "QuantizeResult", "quantize"]

#: quantisers by name: fn(weight m×n, xtx n×n or None, config) -> QuantizedWeight
METHODS: Registry[Callable[..., QuantizedWeight]] = Registry("quantisation method")
METHODS.register("rtn", lambda w, xtx, c: rtn(w, c.bits, c.group_size))
METHODS.register("gptq", lambda w, xtx, c: gptq(w, xtx, c.bits, c.group_size, damp=c.damp, act_order=c.act_order))
_NEEDS_DATA = {"gptq"}


@dataclass
class QuantizeConfig:
    """Everything that defines a quantisation run. The defaults are the best setting we measured (docs/quantize.md)."""

    bits: int = field(default=4, metadata={"help": f"bits per weight: {', '.join(map(str, SUPPORTED_BITS))}"})
    group_size: int = field(default=64, metadata={
        "help": "input columns sharing one scale and zero point; must divide every layer's in_features"})
    method: str = field(default="gptq", metadata={"help": "quantiser", "choices": METHODS.names})
    eora_rank: int | None = field(default=None, metadata={
        "help": "add a rank-R EoRA correction of each quantised matrix, from the calibration activations",
        "metavar": "R"})
    calib: str = field(default="ptb+bbc", metadata={
        "help": "calibration text (train split): ptb, bbc, ptb+bbc (half each) or FILE.txt (gptq and EoRA)"})
    calib_samples: int = field(default=16, metadata={
        "help": "calibration windows (16 × 256 tokens: the setting benchmarked)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration window"})
    seed: int = field(default=0, metadata={"help": "calibration sampling seed"})
    damp: float = field(default=0.01, metadata={"help": "gptq: damping added to H's diagonal, × its mean"})
    act_order: bool = field(default=True, metadata={
        "help": "gptq: quantise columns in descending order of their input energy diag(XᵀX) (static groups)"})
    sequential: bool = field(default=True, metadata={
        "help": "gptq/EoRA: block ℓ is calibrated on the outputs of the quantised blocks < ℓ"})
    targets: str | None = field(default=None, metadata={"help": "regex of module names to quantise (default: all "
                                                                  "linears but the LM head)"})
    exclude: str | None = field(default=None, metadata={"help": "regex of module names to leave alone"})
    batch_size: int = field(default=8, metadata={"cli": False})
    progress: bool = field(default=True, metadata={"cli": False})

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_numbers(self)  # the API bypasses the CLI's parsing: whole 64-bit ints (no str/bool), finite floats
        check_int(self.group_size, "--group-size", minimum=1)
        METHODS.check(self.method)
        if self.eora_rank is not None:
            if isinstance(self.eora_rank, bool) or not isinstance(self.eora_rank, int) or self.eora_rank <= 0:
                raise RankwiseError(f"--eora-rank must be a positive whole number (leave it out for no EoRA), "
                                    f"got {self.eora_rank!r}.")
        check_int(self.calib_samples, "--calib-samples", minimum=1)
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise RankwiseError(f"--seq-len must be a whole number ≥ 2, got {self.seq_len!r}.")
        if not isinstance(self.act_order, bool) or not isinstance(self.sequential, bool):
            raise RankwiseError(f"act_order and sequential must be True or False, got {self.act_order!r} and "
                                f"{self.sequential!r}.")
        if not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp) or not 0 < self.damp < 1:
            raise RankwiseError(f"--damp must lie in (0, 1), got {self.damp!r}.")
        check_int(self.batch_size, "batch_size", minimum=1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizeResult:
    """What a quantisation run did."""

    bits: int
    group_size: int
    method: str
    eora_rank: int | None
    layers: dict[str, dict]  # name -> {shape, rel_err (calibration output error, relative), rel_err_eora}
    bytes_before: int
    bytes_after: int
    seconds: float
    calibration: dict | None
    sequential: bool

    @property
    def mean_rel_err(self) -> float | None:
        vals = [v["rel_err"] for v in self.layers.values() if v.get("rel_err") is not None]
        return sum(vals) / len(vals) if vals else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_rel_err"] = self.mean_rel_err
        return d


# -- checks --------------------------------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_group_size(group_size: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Every in_features must be a multiple of ``group_size``; else name the nearest size that divides them all."""
    bad = [(name, n) for name, (_m, n) in shapes.items() if n % group_size]
    if not bad:
        return
    g = 0
    for _m, n in shapes.values():
        g = math.gcd(g, n)
    nearest = min(_divisors(g), key=lambda d: (abs(d - group_size), -d))
    name, n = bad[0]
    raise RankwiseError(
        f"--group-size {group_size} does not divide in_features {n} of {name}; the nearest valid group size is "
        f"{nearest} (it must divide {g})."
    )


def _check_eora_rank(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    """The correction must store fewer numbers than the dense matrix: r·(m + n) < m·n for every target."""
    for name, (m, n) in shapes.items():
        limit = (m * n - 1) // (m + n)  # largest r with r(m + n) < mn
        if rank > limit:
            raise RankwiseError(
                f"--eora-rank {rank} is above break-even for {name} ({m}×{n}: rank·(m+n) must stay below m·n, so "
                f"at most {limit}); choose a smaller rank."
            )


def already_quantized(model: nn.Module) -> str | None:
    """The name of the first quantised layer in ``model``, or None."""
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, QuantLowRank, QuantSelect)):
            return name
    return None


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors once)."""
    seen: set[int] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# -- the walk ------------------------------------------------------------------------------------------------


def _split(model: nn.Module, pattern: str | None, exclude: str | None) -> tuple[list[str], list[str]]:
    """Make the factorised layers whose names match quantisable; returns (low-rank names, MoDeGPT names).

    Every matching LowRankLinear becomes a QuantLowRank of two nn.Linear, every matching MoDeGPT
    SelectLinear a QuantSelect around one nn.Linear (its kept block); both are quantised next.
    Layers that do not match stay as they are (and save as they are).
    """
    import re

    from rankwise.surgery.lowrank import LowRankLinear
    from rankwise.surgery.modules import set_module
    from rankwise.surgery.select import SelectLinear

    try:
        rx = re.compile(pattern) if pattern else None
        ex = re.compile(exclude) if exclude else None
    except re.error as exc:
        raise RankwiseError(f"--targets is not a valid regular expression ({exc}); e.g. 'q_proj|v_proj'.") from exc

    def wanted(n: str) -> bool:
        return (rx is None or bool(rx.search(n))) and (ex is None or not ex.search(n))

    mods = list(model.named_modules())
    lowrank = [n for n, m in mods if isinstance(m, LowRankLinear) and wanted(n)]
    select = [n for n, m in mods if isinstance(m, SelectLinear) and wanted(n)]
    for n in lowrank:
        set_module(model, n, QuantLowRank.from_lowrank(model.get_submodule(n)))
    for n in select:
        set_module(model, n, QuantSelect.from_select(model.get_submodule(n)))
    return lowrank, select


def _targets(model: nn.Module, lowrank: list[str], select: list[str], pattern: str | None,
             exclude: str | None) -> list:
    """Dense targets (find_targets) plus both factors of every split low-rank layer and every MoDeGPT block."""
    from rankwise.surgery.targets import Target, find_targets

    factors = []
    for n in lowrank:
        mod = model.get_submodule(n)
        factors += [Target(f"{n}.A", mod.A), Target(f"{n}.B", mod.B)]
    factors += [Target(f"{n}.inner", model.get_submodule(n).inner) for n in select]
    try:
        dense = find_targets(model, pattern, exclude)
    except RankwiseError:
        if not factors:
            raise
        dense = []
    names = {t.name for t in factors}
    return [t for t in dense if t.name not in names] + factors


def _walk(model: nn.Module, targets: list, loop: Callable[[nn.Module], Any], process: Callable[[list, dict], None],
          sequential: bool, progress: bool) -> None:
    """Statistics XᵀX of every target, block by block through the shared runner, handed to ``process``."""
    from rankwise.compression.calibration.stats import StatsCollector
    from rankwise.compression.runner import BlockRunner, find_blocks

    blocks = find_blocks(model, targets)
    inside = [t for t in targets if blocks is not None and t.name in blocks.index_of]
    outside = [t for t in targets if t not in inside]
    outside_stats: dict = {}
    if outside:  # layers outside the repeated blocks: statistics from one full pass (of the unquantised model)
        with StatsCollector(outside) as col, torch.no_grad():
            loop(model)
        outside_stats = col.stats
    if inside:
        if blocks is None:  # find_targets put targets inside blocks, so blocks were found
            raise RuntimeError("rankwise bug: targets inside decoder blocks but no blocks found")
        by_block = blocks.targets_of(inside)
        collectors: dict[int, StatsCollector] = {}

        def collect(i: int) -> contextlib.AbstractContextManager:
            collectors[i] = StatsCollector(by_block.get(i, []))
            return collectors[i]

        def step(i: int, block: nn.Module) -> bool:
            tg = by_block.get(i, [])
            if not tg:
                return False
            process(tg, collectors.pop(i).stats)
            return True

        with BlockRunner(model, blocks, loop, progress=progress) as runner:
            runner.walk(step, collect=collect, sequential=sequential, desc="quantize")
    if outside:
        process(outside, outside_stats)


def _output_err(W: torch.Tensor, What: torch.Tensor, C: torch.Tensor) -> float:
    """‖(W − Ŵ) Xᵀ‖²_F / ‖W Xᵀ‖²_F from C = XᵀX (float64)."""
    D = W - What
    total = float(torch.einsum("ij,jk,ik->", W, C, W))
    return float(torch.einsum("ij,jk,ik->", D, C, D)) / total if total > 0 else float("nan")


# -- the public entry point ----------------------------------------------------------------------------------


def quantize(model: nn.Module, config: QuantizeConfig | None = None, calib: Any = None, tokenizer: Any = None,
             **overrides: Any) -> QuantizeResult:
    """Quantise ``model``'s linear layers in place (→ :class:`QuantLinear`) and return what was done.

    ``calib`` (GPTQ and EoRA only): ``None`` (the config's text, train split), a text spec, a
    LongTensor of token windows (samples × seq_len) or a ``forward_loop(model)`` callable.
    ``tokenizer`` defaults to the one in the model's source folder. Keyword ``overrides``
    replace config fields (``quantize(m, bits=3)``). On a ``rankwise compress`` output the two
    factors of every low-rank layer are quantised (a :class:`QuantLowRank`).
    """
    from rankwise.compression.api import CompressConfig, resolve_calib
    from rankwise.compression.eora import eora_factors
    from rankwise.config import check_config_type
    from rankwise.surgery.modules import set_module

    config = check_config_type(config, QuantizeConfig, "rankwise.quantize")
    if overrides:
        config = QuantizeConfig(**{**asdict(config), **overrides})
    t0 = time.perf_counter()
    done = already_quantized(model)
    if done is not None:
        raise RankwiseError(f"the model is already quantised ({done} is a {type(model.get_submodule(done)).__name__});"
                            " quantise the original (or `rankwise compress`) model instead.")
    bytes_before = storage_bytes(model)
    lowrank, select = _split(model, config.targets, config.exclude)
    targets = _targets(model, lowrank, select, config.targets, config.exclude)
    # in_features chosen by the compressor (a factor B's rank, a MoDeGPT block's kept columns): a shorter last
    # group is allowed there
    chosen = {f"{n}.B" for n in lowrank} | {f"{n}.inner" for n in select
                                           if model.get_submodule(n).in_index is not None}
    shapes = {t.name: t.shape for t in targets}
    _check_group_size(config.group_size, {k: v for k, v in shapes.items() if k not in chosen})
    if config.eora_rank is not None:
        _check_eora_rank(config.eora_rank, shapes)
    quantiser = METHODS.get(config.method)
    needs_data = config.method in _NEEDS_DATA or config.eora_rank is not None
    layers: dict[str, dict] = {}

    def process(tg: list, stats: dict) -> None:
        for t in tg:
            W = t.weight()
            st = stats.get(t.name)
            C = None
            if needs_data:
                if st is None or st.rows == 0 or st.xtx is None:
                    raise RankwiseError(f"layer {t.name} received no calibration input; the forward loop must run "
                                        "the whole model.")
                C = st.xtx
                if not bool(torch.isfinite(C).all()):
                    raise RankwiseError(f"calibration statistics of {t.name} contain NaN/inf; check the model weights.")
            q = quantiser(W, C, config)
            layer = QuantLinear.from_quantized(q, bias=t.bias, kind="conv1d" if t.transposed else "linear",
                                               dtype=W.dtype)
            info: dict[str, Any] = {"shape": list(t.shape), "rel_err": None}
            if C is not None:
                W64 = W.to(device=C.device, dtype=torch.float64)
                What = q.dequantize(torch.float64).to(C.device)
                info["rel_err"] = _output_err(W64, What, C)
                if config.eora_rank is not None:
                    B, A, _ = eora_factors(W64 - What, C, config.eora_rank)
                    if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
                        raise RankwiseError(f"EoRA factors of {t.name} contain NaN/inf; check the weights.")
                    layer.set_eora(B, A)
                    info["rel_err_eora"] = _output_err(W64, What + B @ A, C)
            set_module(model, t.name, layer.to(W.device))
            layers[t.name] = info

    was_training = model.training
    model.eval()
    info = None
    try:
        if needs_data:
            cc = CompressConfig(calib=config.calib, calib_samples=config.calib_samples, seq_len=config.seq_len,
                                seed=config.seed, batch_size=config.batch_size, progress=config.progress)
            loop, info = resolve_calib(model, cc, calib, tokenizer)
            _walk(model, targets, loop, process, config.sequential, config.progress)
        else:
            for t in progress_bar(targets, desc="quantize", unit="matrix", enabled=config.progress):
                process([t], {})
    finally:
        if was_training:
            model.train()
    result = QuantizeResult(
        bits=config.bits, group_size=config.group_size, method=config.method, eora_rank=config.eora_rank,
        layers=layers, bytes_before=bytes_before, bytes_after=storage_bytes(model),
        seconds=time.perf_counter() - t0, calibration=info.to_dict() if info else None,
        sequential=bool(needs_data and config.sequential),
    )
    prior = dict(getattr(model, "rankwise_meta", None) or {})
    model.rankwise_meta = {
        **({"lowrank": prior} if prior else {}),
        "quantization": {**config.to_dict(), "calibration": result.calibration, "mean_rel_err": result.mean_rel_err},
    }
    from rankwise.io.checkpoint import mark_factorised

    mark_factorised(model)  # save_pretrained / Trainer.save_model now write a folder from_pretrained rebuilds
    return result

"""Measured speed of dense and factorised models: prefill, decode, peak memory, layer break-even.

Model level (methods.md §6): *prefill* is one forward pass over a prompt
(default 512 tokens, BOS included) that builds the KV cache and computes the
logits of the last position only (what ``generate`` does; ``logits_to_keep=1``);
*decode* is greedy generation of ``new_tokens`` tokens with the KV cache
(the first new token comes from the prefill, then ``new_tokens - 1``
single-token forward passes, exactly like ``model.generate(max_new_tokens=N,
do_sample=False)``). Several models are measured in ONE process, alternately
and in alternating order (A B, B A, ...), after warm-up runs, so machine noise
hits all of them alike; the median over the repeats is reported. Process CPU
seconds are recorded beside wall seconds: with one thread they measure the work
done, unaffected by other processes competing for the cores.

Peak memory: on CPU the resident set size (RSS, via psutil) sampled every
5 ms while a model runs (process-wide, so it includes every model loaded in
the process) and the increase over the RSS just before the run; on CUDA
``torch.cuda.max_memory_allocated``.

Layer level: a rank-k ``LowRankLinear`` does k(m+n) multiply-adds per token
instead of mn, but as two matmul calls. :func:`speed_break_even_rank` gives
the largest rank at which the factorised layer is still not slower than the
dense one, from a cost model t = o·calls + MACs/R fitted to timings measured on
a 2-core CPU (see ``docs/eval.md``), or measured on this machine with
``measure=True``.
"""

from __future__ import annotations

import functools
import inspect
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.engine.linalg import least_squares
from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError
from rankwise.io.tokens import bos_id, encode
from rankwise.progress import progress as progress_bar

# --------------------------------------------------------------------------------------------
# peak memory


class PeakMemory:
    """Context manager recording peak memory while its block runs.

    CPU: samples the process RSS in a background thread (psutil); ``peak_mb`` is
    the highest RSS seen, ``extra_mb`` its increase over the RSS at entry.
    CUDA: ``torch.cuda`` peak allocated bytes on ``device``.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.extra_mb = 0.0
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.kind == "rss":
            import psutil

            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._peak = self._base

            def sample() -> None:
                while not self._stop.is_set():
                    self._peak = max(self._peak, self._proc.memory_info().rss)
                    self._stop.wait(self.interval_s)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        else:
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "rss":
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            peak = self._peak
        else:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        self.peak_mb = peak / 2**20
        self.extra_mb = max(0, peak - self._base) / 2**20


# --------------------------------------------------------------------------------------------
# model level


@dataclass
class SpeedResult:
    """Prefill / decode throughput and peak memory of one model (medians over ``repeats``)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    prefill_s: list[float]
    decode_s: list[float]
    prefill_cpu_s: list[float]
    decode_cpu_s: list[float]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    warmup: int
    peak_memory_mb: float
    peak_memory_extra_mb: float
    memory_kind: str
    device: str
    threads: int
    generated: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def prompt_ids(tokenizer, text: str, n_tokens: int = 512, name: str = "text") -> torch.Tensor:
    """A (1, n_tokens) prompt: BOS (when the tokenizer has one) then the first tokens of ``text``."""
    if n_tokens < 1:
        raise RankwiseError(f"the prompt needs at least one token, got {n_tokens}.")
    b = bos_id(tokenizer)
    body = n_tokens - (1 if b is not None else 0)
    ids = encode(tokenizer, text, max_chars=max(20_000, body * 12))
    if len(ids) < body:
        raise RankwiseError(
            f"{name} has {len(ids)} tokens, fewer than the {body} a {n_tokens}-token speed prompt needs; "
            "use a longer text or a shorter prompt."
        )
    ids = ids[:body]
    if b is not None:
        ids = torch.cat([torch.tensor([b], dtype=torch.long), ids])
    return ids[None]


def _supports(model: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model: nn.Module) -> str | None:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        if _supports(model, name):
            return name
    return None


def _is_generative(model: nn.Module) -> bool:
    return _cache_kwarg(model) is not None and hasattr(model, "get_output_embeddings") and (
        model.get_output_embeddings() is not None
    )


def _cache_of(out) -> object:
    """The KV cache returned by a forward pass, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _timed_decode(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decode; returns (tokens, [prefill wall, decode wall, prefill cpu, decode cpu] seconds)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    kw: dict = {}
    if _supports(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1
    generative = _is_generative(model)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    if not generative:
        model(input_ids=ids)
        _sync(device)
        return [], [time.perf_counter() - t0, 0.0, time.process_time() - c0, 0.0]
    out = model(input_ids=ids, use_cache=True, **kw)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    tokens = [int(nxt)]
    cache_kw = _cache_kwarg(model)
    past = _cache_of(out)
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
        past = _cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
    _sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    return tokens, [t1 - t0, t2 - t1, c1 - c0, c2 - c1]


def greedy_decode(
    model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 64
) -> tuple[list[int], float, float]:
    """Greedy generation with the KV cache; returns (new token ids, prefill seconds, decode seconds).

    The first new token comes from the prefill pass (last-position logits only),
    the other ``new_tokens - 1`` from single-token passes reusing the cache; the
    tokens equal ``model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)``.
    Models without a KV cache / LM head (encoders) run the prefill only.
    """
    tokens, t = _timed_decode(model, input_ids, new_tokens)
    return tokens, t[0], t[1]


def measure_speed(
    models: Mapping[str, nn.Module] | nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, SpeedResult]:
    """Prefill and decode tokens/s and peak memory of each model, measured alternately in this process.

    ``models``: one model or {name: model}. Each round runs every model once, the
    order reversed on every other round; ``warmup`` untimed rounds come first.
    Returns {name: SpeedResult} (a single model is named ``"model"``).
    """
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not models:
        raise RankwiseError("measure_speed needs at least one model.")
    if repeats < 1 or warmup < 0 or new_tokens < 1:
        raise RankwiseError(f"need repeats >= 1, warmup >= 0, new_tokens >= 1 (got {repeats}, {warmup}, {new_tokens}).")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    names = list(models)
    for m in models.values():
        m.eval()
    pre: dict[str, list[float]] = {n: [] for n in names}
    dec: dict[str, list[float]] = {n: [] for n in names}
    pre_cpu: dict[str, list[float]] = {n: [] for n in names}
    dec_cpu: dict[str, list[float]] = {n: [] for n in names}
    mem: dict[str, tuple[float, float, str]] = {}
    toks: dict[str, list[int]] = {}
    rounds = range(warmup + repeats)
    bar = progress_bar(len(rounds) * len(names), desc="speed", unit="run") if progress else None
    for r in rounds:
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            model = models[n]
            device = next(model.parameters()).device
            with PeakMemory(device) as pm:
                tokens, (tp, td, cp, cd) = _timed_decode(model, input_ids, new_tokens)
            prev = mem.get(n)
            if prev is None or pm.peak_mb > prev[0]:
                mem[n] = (pm.peak_mb, max(pm.extra_mb, prev[1] if prev else 0.0), pm.kind)
            else:
                mem[n] = (prev[0], max(prev[1], pm.extra_mb), prev[2])
            toks[n] = tokens
            if r >= warmup:
                pre[n].append(tp)
                dec[n].append(td)
                pre_cpu[n].append(cp)
                dec_cpu[n].append(cd)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out: dict[str, SpeedResult] = {}
    prompt = int(input_ids.shape[1])
    for n in names:
        device = next(models[n].parameters()).device
        tp = statistics.median(pre[n])
        td = statistics.median(dec[n])
        generative = bool(toks[n])
        out[n] = SpeedResult(
            prefill_tokens_per_s=prompt / tp,
            decode_tokens_per_s=((new_tokens - 1) / td if td > 0 else None) if generative else None,
            prefill_s=pre[n],
            decode_s=dec[n] if generative else [],
            prefill_cpu_s=pre_cpu[n],
            decode_cpu_s=dec_cpu[n] if generative else [],
            prompt_tokens=prompt,
            new_tokens=new_tokens if generative else 0,
            repeats=repeats,
            warmup=warmup,
            peak_memory_mb=mem[n][0],
            peak_memory_extra_mb=mem[n][1],
            memory_kind=mem[n][2],
            device=str(device),
            threads=torch.get_num_threads(),
            generated=toks[n],
        )
    return out


# --------------------------------------------------------------------------------------------
# layer level


def _mean_time(fn: Callable[[], object], reps: int, clock: Callable[[], float] = time.perf_counter) -> float:
    t = clock()
    for _ in range(reps):
        fn()
    return (clock() - t) / reps


@torch.inference_mode()
def time_layers(
    m: int,
    n: int,
    ranks: Sequence[int],
    tokens: int = 512,
    rounds: int = 7,
    target_s: float = 0.01,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    clock: str = "wall",
) -> tuple[float, dict[int, float]]:
    """Seconds per call of a dense m×n layer and of rank-k factorised layers on (1, tokens, n) inputs.

    The dense and factorised calls are timed alternately (``rounds`` rounds),
    each round long enough (~``target_s``) to beat timer noise; the fastest
    round counts (on a shared machine noise only ever adds time). ``clock="cpu"``
    uses process CPU time instead of wall time (for 1-thread runs on a busy machine).
    Returns (dense seconds, {rank: factorised seconds}).
    """
    if clock not in ("wall", "cpu"):
        raise RankwiseError(f"clock must be 'wall' or 'cpu', got {clock!r}.")
    tick = time.perf_counter if clock == "wall" else time.process_time
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, n, generator=g, dtype=dtype)
    w = torch.randn(m, n, generator=g, dtype=dtype)
    fns: dict[object, Callable[[], object]] = {"dense": lambda: F.linear(x, w)}
    for k in ranks:
        a = torch.randn(k, n, generator=g, dtype=dtype)
        b = torch.randn(m, k, generator=g, dtype=dtype)
        fns[int(k)] = lambda a=a, b=b: F.linear(F.linear(x, a), b)
    reps = {}
    for key, fn in fns.items():  # warm-up, and size each round to ~target_s
        fn()
        one = _mean_time(fn, 3)
        reps[key] = max(1, min(2000, int(target_s / max(one, 1e-7))))
    times: dict[object, list[float]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            times[key].append(_mean_time(fn, reps[key], tick))
    dense = min(times.pop("dense"))
    return dense, {int(k): min(v) for k, v in times.items()}


@dataclass(frozen=True)
class LayerCostModel:
    """t = overhead_s · calls + MACs / mac_rate (dense), + MACs / (mac_rate · efficiency) (factorised).

    A dense layer is one call of m·n·T multiply-adds; a rank-k factorised layer
    two calls of k(m+n)·T in total, at a relative efficiency ``efficiency``
    (small inner dimensions run slower). Fitted per token count.
    """

    tokens: int
    overhead_s: float
    mac_rate: float
    efficiency: float

    def dense_s(self, m: int, n: int) -> float:
        return self.overhead_s + m * n * self.tokens / self.mac_rate

    def factorised_s(self, m: int, n: int, k: int) -> float:
        return 2 * self.overhead_s + k * (m + n) * self.tokens / (self.mac_rate * self.efficiency)

    def break_even(self, m: int, n: int) -> float:
        """The (real-valued) rank where factorised and dense times are equal."""
        per_rank = (m + n) * self.tokens / (self.mac_rate * self.efficiency)
        return (self.dense_s(m, n) - 2 * self.overhead_s) / per_rank

    def to_dict(self) -> dict:
        return asdict(self)


def fit_cost_model(samples: Sequence[tuple[int, int, int | None, float]], tokens: int) -> LayerCostModel:
    """Fit :class:`LayerCostModel` to measured (m, n, rank or None for dense, seconds) at ``tokens``.

    Weighted least squares on relative error for (overhead, 1/rate, 1/(rate·eff)).
    """
    rows, ys = [], []
    for m, n, k, t in samples:
        if k is None:
            rows.append([1.0, m * n * tokens, 0.0])
        else:
            rows.append([2.0, 0.0, k * (m + n) * tokens])
        ys.append(t)
    a = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    wgt = 1.0 / y
    sol = least_squares(a * wgt[:, None], y * wgt)
    o, inv_r, inv_re = (float(v) for v in sol)
    o = max(o, 0.0)
    inv_r = max(inv_r, 1e-18)
    inv_re = max(inv_re, 1e-18)
    return LayerCostModel(tokens=tokens, overhead_s=o, mac_rate=1.0 / inv_r, efficiency=inv_r / inv_re)


SMOLLM2_SHAPES: tuple[tuple[int, int], ...] = ((576, 576), (192, 576), (1536, 576), (576, 1536))
"""(out, in) of SmolLM2-135M's matrices: q/o, k/v, gate/up, down."""

# Fitted (fit_cost_model) to time_layers timings on the project's 2-core AVX-512 CPU while it was idle
# (torch 2.13 CPU, MKL, fp32, 2 threads), SmolLM2 shapes, ranks 0.2–1.0 × break-even; predictions within
# ~10 % of the measurements. bench/compress_speed.py re-measures and re-fits them.
DEFAULT_COST_MODELS: dict[int, LayerCostModel] = {
    1: LayerCostModel(tokens=1, overhead_s=1.1e-06, mac_rate=1.37e10, efficiency=0.84),
    64: LayerCostModel(tokens=64, overhead_s=7.2e-06, mac_rate=8.57e10, efficiency=0.91),
    512: LayerCostModel(tokens=512, overhead_s=2.9e-05, mac_rate=1.03e11, efficiency=0.92),
}


@functools.lru_cache(maxsize=64)
def _measured_model(tokens: int, shapes: tuple[tuple[int, int], ...]) -> LayerCostModel:
    samples: list[tuple[int, int, int | None, float]] = []
    for m, n in shapes:
        be = break_even_rank(m, n)
        ranks = sorted({max(1, int(f * be)) for f in (0.25, 0.5, 0.75, 1.0)})
        dense, fact = time_layers(m, n, ranks, tokens=tokens, rounds=3, target_s=0.005)
        samples.append((m, n, None, dense))
        samples.extend((m, n, k, t) for k, t in fact.items())
    return fit_cost_model(samples, tokens)


def cost_model(tokens: int = 512, measure: bool = False) -> LayerCostModel:
    """The layer cost model for ``tokens`` tokens per call.

    ``measure=False``: the built-in fit whose token count is nearest in log
    scale. ``measure=True``: time SmolLM2-shaped layers on this machine now
    (about a second; cached per process).
    """
    if tokens < 1:
        raise RankwiseError(f"tokens must be >= 1, got {tokens}.")
    if measure:
        return _measured_model(int(tokens), SMOLLM2_SHAPES)
    near = min(DEFAULT_COST_MODELS, key=lambda t: abs(math.log(t) - math.log(tokens)))
    base = DEFAULT_COST_MODELS[near]
    return LayerCostModel(tokens=int(tokens), overhead_s=base.overhead_s, mac_rate=base.mac_rate,
                          efficiency=base.efficiency)


def speed_break_even_rank(
    m: int, n: int, tokens: int | Sequence[int] = 512, measure: bool = False, model: LayerCostModel | None = None
) -> int:
    """Largest rank k at which a factorised m×n layer (two matmuls) is not slower than the dense one.

    Also capped below the parameter break-even rank ⌈mn/(m+n)⌉ (a factorised
    layer must save parameters). ``tokens``: tokens per call (512 ≈ prefill,
    1 = decode); a sequence gives the minimum over them (not slower in any).
    ``measure``/``model``: see :func:`cost_model`. Returns 0 when no rank
    is fast enough (keep the layer dense).
    """
    if m < 1 or n < 1:
        raise RankwiseError(f"matrix shape must be positive, got {m}×{n}.")
    ts = [tokens] if isinstance(tokens, int) else list(tokens)
    cap = break_even_rank(m, n) - 1
    best = cap
    for t in ts:
        cm = model if model is not None else cost_model(int(t), measure=measure)
        best = min(best, math.floor(cm.break_even(m, n)))
    return max(0, best)


def slow_layers(
    model: nn.Module, tokens: int | Sequence[int] = 512, cost: LayerCostModel | None = None
) -> dict[str, dict[str, int]]:
    """LowRankLinear layers whose rank exceeds :func:`speed_break_even_rank`: slower than their dense form.

    Returns {module name: {"rank", "speed_break_even", "break_even"}}.
    """
    from rankwise.surgery.lowrank import LowRankLinear

    out: dict[str, dict[str, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankLinear):
            m, n = mod.out_features, mod.in_features
            k_fast = speed_break_even_rank(m, n, tokens=tokens, model=cost)
            if mod.rank > k_fast:
                out[name] = {"rank": mod.rank, "speed_break_even": k_fast, "break_even": break_even_rank(m, n)}
    return out


def densify_slow_layers(
    model: nn.Module, tokens: int | Sequence[int] = 512, cost: LayerCostModel | None = None
) -> list[str]:
    """Turn every factorised layer that would be slower than dense back into its dense layer B·A, in place.

    The model's function is unchanged (the dense weight is exactly B·A); it gets a
    little bigger and no slower. Returns the names of the layers changed.
    """
    from rankwise.surgery.modules import get_module, set_module

    names = list(slow_layers(model, tokens=tokens, cost=cost))
    for name in names:
        set_module(model, name, get_module(model, name).to_dense())
    return names

"""Measured speed of dense and factorised models: prefill and decode tokens/s, peak memory.

Model level (docs/methods.md §6): *prefill* is one forward pass over a prompt
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

Peak memory comes from the project's one sampler, :class:`rankwise.evaluation.memory.PeakMemory`.
The layer-level pieces live beside this module: ``microbench`` (timing dense vs
factorised layers) and ``cost_model`` (the fitted cost model, break-even ranks,
slow layers); their names are re-exported here for existing imports.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.evaluation.memory import PeakMemory
from rankwise.evaluation.models import input_device
from rankwise.io.tokens import bos_id, encode
from rankwise.progress import progress as progress_bar

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
    device = input_device(model)
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
            device = input_device(model)
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
        device = input_device(models[n])
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


# layer level: kept importable from here (moved to microbench.py and cost_model.py)
from rankwise.evaluation.cost_model import (  # noqa: E402
    DEFAULT_COST_MODELS,
    SMOLLM2_SHAPES,
    LayerCostModel,
    cost_model,
    densify_slow_layers,
    fit_cost_model,
    slow_layers,
    speed_break_even_rank,
)
from rankwise.evaluation.microbench import time_layers  # noqa: E402

__all__ = [
    "DEFAULT_COST_MODELS",
    "SMOLLM2_SHAPES",
    "LayerCostModel",
    "PeakMemory",
    "SpeedResult",
    "cost_model",
    "densify_slow_layers",
    "fit_cost_model",
    "greedy_decode",
    "measure_speed",
    "prompt_ids",
    "slow_layers",
    "speed_break_even_rank",
    "time_layers",
]

"""When is a factorised layer faster than its dense one? A fitted cost model and break-even ranks.

A rank-k ``LowRankLinear`` does k(m+n) multiply-adds per token instead of mn, but
as two matmul calls. :class:`LayerCostModel` is t = o·calls + MACs/R (dense) and
t = 2o + MACs/(R·efficiency) (factorised); :func:`speed_break_even_rank` gives the
largest rank at which the factorised layer is still not slower than the dense one.

The built-in models (one per tokens-per-call: 1 = decode, 64, 512 = prefill) were
fitted on one machine and live in the data file ``cost_model.json`` beside this
module, with the command that re-fits them on the machine at hand::

    python -m rankwise.evaluation.cost_model --fit --out src/rankwise/evaluation/cost_model.json

``measure=True`` instead times SmolLM2-shaped layers here and now (about a second).

:func:`speed_max_ranks` turns this into per-matrix rank limits for the allocators
(``rankwise.compress``'s ``speed_guard``): no factorised layer slower than its dense one.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rankwise.engine.metrics import break_even_rank
from rankwise.errors import RankwiseError

DATA_FILE = "cost_model.json"

SMOLLM2_SHAPES: tuple[tuple[int, int], ...] = ((576, 576), (192, 576), (1536, 576), (576, 1536))
"""(out, in) of SmolLM2-135M's matrices: q/o, k/v, gate/up, down."""


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
    import torch

    from rankwise.engine.linalg import least_squares

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


def load_cost_models(path: str | Path | None = None) -> dict[int, LayerCostModel]:
    """The cost models of a data file (default: the packaged ``cost_model.json``), keyed by tokens per call."""
    try:
        if path is None:
            text = resources.files("rankwise.evaluation").joinpath(DATA_FILE).read_text(encoding="utf-8")
        else:
            text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
        models = [LayerCostModel(int(d["tokens"]), float(d["overhead_s"]), float(d["mac_rate"]),
                                 float(d["efficiency"])) for d in data["models"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RankwiseError(f"the layer cost model file {path or DATA_FILE} is unreadable ({exc}); "
                            "re-fit it with python -m rankwise.evaluation.cost_model --fit.") from exc
    for cm in models:
        if not (cm.tokens >= 1 and all(math.isfinite(v) and v > 0 for v in (cm.mac_rate, cm.efficiency))
                and math.isfinite(cm.overhead_s) and cm.overhead_s >= 0):
            raise RankwiseError(f"the layer cost model file {path or DATA_FILE} holds an invalid model {cm}; "
                                "re-fit it with python -m rankwise.evaluation.cost_model --fit.")
    return {cm.tokens: cm for cm in models}


DEFAULT_COST_MODELS: dict[int, LayerCostModel] = load_cost_models()
"""The packaged fits, {tokens per call: model} (see ``cost_model.json`` for the machine they come from)."""


def measure_cost_model(tokens: int, shapes: Sequence[tuple[int, int]] = SMOLLM2_SHAPES, rounds: int = 3,
                       target_s: float = 0.005) -> LayerCostModel:
    """Fit a cost model for ``tokens`` to layers timed on this machine now (ranks ¼–1 × break-even)."""
    from rankwise.evaluation.microbench import time_layers

    samples: list[tuple[int, int, int | None, float]] = []
    for m, n in shapes:
        be = break_even_rank(m, n)
        ranks = sorted({max(1, int(f * be)) for f in (0.25, 0.5, 0.75, 1.0)})
        dense, fact = time_layers(m, n, ranks, tokens=tokens, rounds=rounds, target_s=target_s)
        samples.append((m, n, None, dense))
        samples.extend((m, n, k, t) for k, t in fact.items())
    return fit_cost_model(samples, tokens)


@functools.lru_cache(maxsize=64)
def _measured_model(tokens: int, shapes: tuple[tuple[int, int], ...]) -> LayerCostModel:
    return measure_cost_model(tokens, shapes)


def _nearest(models: Mapping[int, LayerCostModel], tokens: int) -> LayerCostModel:
    near = min(models, key=lambda t: abs(math.log(t) - math.log(tokens)))
    base = models[near]
    return LayerCostModel(tokens=int(tokens), overhead_s=base.overhead_s, mac_rate=base.mac_rate,
                          efficiency=base.efficiency)


def cost_model(tokens: int = 512, measure: bool = False) -> LayerCostModel:
    """The layer cost model for ``tokens`` tokens per call.

    ``measure=False``: the packaged fit whose token count is nearest in log
    scale. ``measure=True``: time SmolLM2-shaped layers on this machine now
    (about a second; cached per process).
    """
    if tokens < 1:
        raise RankwiseError(f"tokens must be >= 1, got {tokens}.")
    if measure:
        return _measured_model(int(tokens), SMOLLM2_SHAPES)
    return _nearest(DEFAULT_COST_MODELS, tokens)


def speed_break_even_rank(
    m: int, n: int, tokens: int | Sequence[int] = 512, measure: bool = False,
    model: LayerCostModel | Mapping[int, LayerCostModel] | None = None,
) -> int:
    """Largest rank k at which a factorised m×n layer (two matmuls) is not slower than the dense one.

    Also capped below the parameter break-even rank ⌈mn/(m+n)⌉ (a factorised
    layer must save parameters). ``tokens``: tokens per call (512 ≈ prefill,
    1 = decode); a sequence gives the minimum over them (not slower in any).
    ``measure``: see :func:`cost_model`; ``model``: one cost model for every token count, or
    {tokens: model} (the nearest in log scale is used, like the packaged ones). Returns 0 when
    no rank is fast enough (keep the layer dense).
    """
    if m < 1 or n < 1:
        raise RankwiseError(f"matrix shape must be positive, got {m}×{n}.")
    ts = [tokens] if isinstance(tokens, int) else list(tokens)
    cap = break_even_rank(m, n) - 1
    best = cap
    for t in ts:
        if isinstance(model, Mapping):
            cm = _nearest(model, int(t))
        else:
            cm = model if model is not None else cost_model(int(t), measure=measure)
        best = min(best, math.floor(cm.break_even(m, n)))
    return max(0, best)


COST_SOURCES = ("builtin", "measure")
"""Named cost-model sources of :func:`resolve_cost_models`; anything else is a data-file path."""


def resolve_cost_models(source: str | Path = "builtin") -> dict[int, LayerCostModel]:
    """{tokens: model} from ``"builtin"`` (the packaged fit), ``"measure"`` (fit here, now) or a data file.

    A data file is what ``python -m rankwise.evaluation.cost_model --fit --out FILE`` writes; fit it
    on the machine the compressed model will run on.
    """
    if source == "builtin":
        return dict(DEFAULT_COST_MODELS)
    if source == "measure":
        return {t: _measured_model(t, SMOLLM2_SHAPES) for t in sorted(DEFAULT_COST_MODELS)}
    return load_cost_models(source)


def parse_tokens(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"1,512"`` (or ints) → (1, 512): tokens per call that a speed guard must not be slower at."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        parts: list = [spec]
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
    else:
        parts = list(spec)
    out = []
    for p in parts:
        try:
            v = int(p)
        except (TypeError, ValueError):
            v = 0
        if isinstance(p, bool) or v < 1 or str(v) != str(p).strip():
            raise RankwiseError(f"tokens per call must be whole numbers ≥ 1 separated by commas (e.g. 1,512), "
                                f"got {spec!r}.")
        out.append(v)
    if not out:
        raise RankwiseError(f"tokens per call must name at least one count (e.g. 1,512), got {spec!r}.")
    return tuple(sorted(set(out)))


def speed_max_ranks(
    shapes: Sequence[tuple[int, int]],
    tokens: int | Sequence[int] = (1, 512),
    cost: str | Path | LayerCostModel | Mapping[int, LayerCostModel] = "builtin",
) -> list[int]:
    """Per-matrix rank limits so that no factorised (out, in) matrix is slower than dense at any of ``tokens``.

    One :func:`speed_break_even_rank` per shape (0 = keep it dense), the allocators'
    ``max_ranks``. ``cost``: ``"builtin"``, ``"measure"``, a cost-model data file, or model(s).
    """
    models = resolve_cost_models(cost) if isinstance(cost, (str, Path)) else cost
    cache: dict[tuple[int, int], int] = {}
    out = []
    for m, n in shapes:
        if (m, n) not in cache:
            cache[(m, n)] = speed_break_even_rank(m, n, tokens=tokens, model=models)
        out.append(cache[(m, n)])
    return out


def slow_layers(model: Any, tokens: int | Sequence[int] = 512,
                cost: LayerCostModel | None = None) -> dict[str, dict[str, int]]:
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


def densify_slow_layers(model: Any, tokens: int | Sequence[int] = 512,
                        cost: LayerCostModel | None = None) -> list[str]:
    """Turn every factorised layer that would be slower than dense back into its dense layer B·A, in place.

    The swap itself is surgery's (``LowRankLinear.to_dense`` + ``surgery.set_module``); this only
    chooses the layers. The model's function is unchanged (the dense weight is exactly B·A); it gets a
    little bigger and no slower. Returns the names of the layers changed.
    """
    from rankwise.surgery.modules import get_module, set_module

    names = list(slow_layers(model, tokens=tokens, cost=cost))
    for name in names:
        set_module(model, name, get_module(model, name).to_dense())
    return names


def main(argv: list[str] | None = None) -> int:
    """``python -m rankwise.evaluation.cost_model --fit [--out FILE]``: re-fit the packaged models here."""
    p = argparse.ArgumentParser(prog="python -m rankwise.evaluation.cost_model", description=main.__doc__)
    p.add_argument("--fit", action="store_true", help="time SmolLM2-shaped layers and fit one model per token count")
    p.add_argument("--tokens", default="1,64,512", help="tokens per call to fit (default 1,64,512)")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds per layer (fastest counts)")
    p.add_argument("--out", default=None, help="write the data file here (default: print it)")
    args = p.parse_args(argv)
    if not args.fit:
        print(json.dumps({str(t): cm.to_dict() for t, cm in DEFAULT_COST_MODELS.items()}, indent=2))
        return 0
    import os
    import platform

    import torch

    models = [measure_cost_model(int(t), rounds=args.rounds, target_s=0.01) for t in args.tokens.split(",")]
    data = {
        "about": "Layer cost models t = overhead_s * calls + MACs / mac_rate (dense) or MACs / (mac_rate * "
                 "efficiency) (factorised), one per tokens-per-call, fitted to time_layers timings of "
                 "SmolLM2-135M's matrix shapes at ranks 0.25-1.0 x break-even.",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, load average {[round(x, 2) for x in os.getloadavg()]}",
        "fit_command": "python -m rankwise.evaluation.cost_model --fit --out src/rankwise/evaluation/cost_model.json",
        "models": [cm.to_dict() for cm in models],
    }
    text = json.dumps(data, indent=2) + "\n"
    if args.out:
        from rankwise.io.atomic import atomic_file

        with atomic_file(args.out) as fh:
            fh.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation: perplexity on held-out text, model size, and measured speed of dense vs factorised models.

Modules: ``perplexity``, ``report`` (sizes), ``speed`` (prefill/decode tokens/s), ``memory``
(the one peak-memory sampler), ``microbench`` (layer timings), ``cost_model`` (fitted layer
cost model and break-even ranks; constants in ``cost_model.json``), ``config`` (EvalConfig),
``models`` (loading the models an eval measures), ``plot`` (the multi-model picture).
Names are imported on first access (PEP 562), so ``rankwise.evaluation.memory`` loads alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "PeakMemory": "rankwise.evaluation.memory",
    "PerplexityResult": "rankwise.evaluation.perplexity",
    "evaluate_texts": "rankwise.evaluation.perplexity",
    "perplexity": "rankwise.evaluation.perplexity",
    "SizeReport": "rankwise.evaluation.report",
    "size_report": "rankwise.evaluation.report",
    "SpeedResult": "rankwise.evaluation.speed",
    "measure_speed": "rankwise.evaluation.speed",
    "prompt_ids": "rankwise.evaluation.speed",
    "densify_slow_layers": "rankwise.evaluation.cost_model",
    "slow_layers": "rankwise.evaluation.cost_model",
    "speed_break_even_rank": "rankwise.evaluation.cost_model",
}
__all__ = [
    "PeakMemory",
    "PerplexityResult",
    "SizeReport",
    "SpeedResult",
    "densify_slow_layers",
    "evaluate_texts",
    "measure_speed",
    "perplexity",
    "prompt_ids",
    "size_report",
    "slow_layers",
    "speed_break_even_rank",
]

if TYPE_CHECKING:
    from rankwise.evaluation.cost_model import densify_slow_layers, slow_layers, speed_break_even_rank
    from rankwise.evaluation.memory import PeakMemory
    from rankwise.evaluation.perplexity import PerplexityResult, evaluate_texts, perplexity
    from rankwise.evaluation.report import SizeReport, size_report
    from rankwise.evaluation.speed import SpeedResult, measure_speed, prompt_ids


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankwise.evaluation' has no attribute {name!r}")

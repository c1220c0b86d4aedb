"""Evaluation: perplexity on held-out text, model size, and measured speed of dense vs factorised models."""

from rankwise.evaluation.perplexity import PerplexityResult, evaluate_texts, perplexity
from rankwise.evaluation.report import SizeReport, size_report
from rankwise.evaluation.speed import (
    SpeedResult,
    densify_slow_layers,
    measure_speed,
    prompt_ids,
    slow_layers,
    speed_break_even_rank,
)

__all__ = [
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

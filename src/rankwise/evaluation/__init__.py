"""Evaluation: perplexity on held-out text (and, in speed.py, measured throughput)."""

from rankwise.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

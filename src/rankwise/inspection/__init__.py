"""Spectral inspection of a model's weight matrices: metrics, table, HTML report, comparisons."""

from rankwise.inspection.api import InspectConfig, InspectReport, inspect

__all__ = ["InspectConfig", "InspectReport", "inspect"]

"""Calibration: forward loops from text and hooks collecting input statistics.

The block-by-block walk over calibration data is :mod:`rankwise.compression.runner`.
"""

from rankwise.compression.calibration.loops import (
    CalibInfo,
    ForwardLoop,
    text_forward_loop,
    text_windows,
    windows_forward_loop,
)
from rankwise.compression.calibration.stats import LayerStats, StatsCollector

__all__ = [
    "CalibInfo",
    "ForwardLoop",
    "LayerStats",
    "StatsCollector",
    "text_forward_loop",
    "text_windows",
    "windows_forward_loop",
]

"""Calibration: forward loops from text, hooks collecting input statistics, sequential blocks."""

from rankwise.compression.calibration.blocks import Blocks, capture_block_inputs, find_blocks, run_block
from rankwise.compression.calibration.loops import (
    CalibInfo,
    ForwardLoop,
    text_forward_loop,
    text_windows,
    windows_forward_loop,
)
from rankwise.compression.calibration.stats import LayerStats, StatsCollector

__all__ = [
    "Blocks",
    "CalibInfo",
    "ForwardLoop",
    "LayerStats",
    "StatsCollector",
    "capture_block_inputs",
    "find_blocks",
    "run_block",
    "text_forward_loop",
    "text_windows",
    "windows_forward_loop",
]

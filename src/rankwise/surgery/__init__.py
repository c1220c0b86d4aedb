"""Model surgery: find target matrices in any nn.Linear / Conv1D model and swap layers."""

from rankwise.surgery.lowrank import LowRankLinear
from rankwise.surgery.modules import get_module, set_module
from rankwise.surgery.targets import Target, find_targets, is_matrix_module

__all__ = ["LowRankLinear", "Target", "find_targets", "get_module", "is_matrix_module", "set_module"]

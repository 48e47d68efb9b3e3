"""Log-Linear Attention (Guo et al. 2025): Fenwick-tree multi-state linear attention."""

from dlax.ops.log_linear.levels import LogLinearState, fenwick_levels
from dlax.ops.log_linear.op import log_linear_attention, log_linear_step

__all__ = ["LogLinearState", "fenwick_levels", "log_linear_attention", "log_linear_step"]

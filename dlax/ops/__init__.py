"""Pure functional ops: arrays in, arrays out. Each op has recurrent and masked references."""

from dlax.ops.dla import DLACache, DLADecisions, dla_attention, dla_step
from dlax.ops.gated_delta import gated_delta, gated_delta_step
from dlax.ops.log_linear import LogLinearState, log_linear_attention, log_linear_step
from dlax.ops.ssd import ssd, ssd_step

__all__ = [
    "DLACache", "DLADecisions", "dla_attention", "dla_step", "gated_delta", "gated_delta_step",
    "LogLinearState", "log_linear_attention", "log_linear_step",
    "ssd", "ssd_step",
]

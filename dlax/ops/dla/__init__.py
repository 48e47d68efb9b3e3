"""Dynamic Linear Attention (DLA): multi-state linear attention with data-dependent boundaries."""

from dlax.ops.dla.op import dla_attention, dla_step
from dlax.ops.dla.types import DLACache, DLADecisions

__all__ = ["DLACache", "DLADecisions", "dla_attention", "dla_step"]

"""Mamba-2 SSD / scalar-gated linear attention."""

from dlax.ops.ssd.op import ssd, ssd_step

__all__ = ["ssd", "ssd_step"]

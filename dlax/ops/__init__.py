"""Pure functional ops: arrays in, arrays out. Each op has recurrent and masked references."""

from dlax.ops.ssd import ssd, ssd_step

__all__ = ["ssd", "ssd_step"]

"""What the kernels share: where they run (compiled or interpreted) and chunk-shape helpers.

Kernels run compiled on their own platform and interpreted elsewhere, so every kernel can be
tested on CPU: GPU-style kernels with `interpret=True`, TPU kernels with
`pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")` (a race or a read of
memory nobody wrote then fails the test instead of passing silently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu


def triton_interpret(interpret: bool | None = None) -> bool:
  """`interpret=` for a Triton-lowered `pallas_call`: True unless running on a GPU."""
  return jax.default_backend() != "gpu" if interpret is None else interpret


def tpu_interpret(interpret: bool | None = None):
  """`interpret=` for a Mosaic `pallas_call`: race-checking interpret mode unless on a TPU."""
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  return pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan") if interpret else False


def pad_time(x, multiple: int, axis: int = 1):
  """Zero-pads axis `axis` to a multiple of `multiple` (g = 0, k = v = 0 is an identity step)."""
  if x is None or x.shape[axis] % multiple == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, widths)


def next_power_of_2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()

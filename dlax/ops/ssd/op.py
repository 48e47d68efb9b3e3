"""`ssd`: Mamba-2 state-space duality / scalar-gated linear attention, one op with three backends."""

from __future__ import annotations

import jax.numpy as jnp

from dlax.ops.common import (Impl, KERNEL_IMPLS, accumulator_dtype, check_chunk_size, check_inputs,
                             default_scale, kernel, resolve_impl)
from dlax.ops.ssd.chunked import ssd_chunked
from dlax.ops.ssd.naive import ssd_masked, ssd_recurrent, ssd_step_reference


def ssd(q, k, v, g, *, scale: float | None = None, initial_state=None, chunk_size: int = 64,
        impl: Impl = "chunked"):
  """Scalar-gated linear attention: `S_t = exp(g_t) S_{t−1} + k_t v_tᵀ`, `o_t = S_tᵀ (scale q_t)`.

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g: `[B, T, H]` log-decay (≤ 0), float32/float64.
    scale: query scale; defaults to `Dk ** -0.5` (fla's convention). Mamba-2 uses 1.0.
    initial_state: optional `[B, H, Dk, Dv]` state to continue from.
    chunk_size: C in [1, 256] for `impl="chunked"`; T need not be a multiple of C.
    impl: "chunked" (default, XLA), "recurrent" (token-by-token oracle), "masked" (O(T²)),
      "pallas_triton" / "pallas_tpu" (kernels; interpret mode on CPU), or None: the platform's
      kernel on GPU/TPU, else "chunked".

  Returns:
    (o `[B, T, H, Dv]` in v's dtype, final state `[B, H, Dk, Dv]` in fp32, or fp64 for fp64 inputs).
  """
  impl = resolve_impl("ssd", impl)
  check_chunk_size("ssd", chunk_size)
  check_inputs("ssd", q, k, v, g, initial_state=initial_state)
  scale = default_scale(q, scale)
  if impl in KERNEL_IMPLS:
    return kernel("ssd", impl)(q, k, v, g, scale=scale, chunk_size=chunk_size,
                               initial_state=initial_state)
  if impl == "recurrent":
    return ssd_recurrent(q, k, v, g, scale=scale, initial_state=initial_state)
  if impl == "masked":
    return ssd_masked(q, k, v, g, scale=scale, initial_state=initial_state)
  return ssd_chunked(q, k, v, g, scale=scale, chunk_size=chunk_size, initial_state=initial_state)


def ssd_step(q, k, v, g, state=None, *, scale: float | None = None):
  """Single-token decode step. q, k `[B, H, Dk]`, v `[B, H, Dv]`, g `[B, H]`,
  state `[B, H, Dk, Dv]` or None (zeros). Returns (o `[B, H, Dv]` in v's dtype, new state)."""
  check_inputs("ssd_step", q, k, v, g, initial_state=state, step=True)
  acc = accumulator_dtype(q, k, v, g, state)
  if state is None:
    state = jnp.zeros((*q.shape, v.shape[-1]), acc)
  o, state = ssd_step_reference(q, k, v, g, state.astype(acc), scale=default_scale(q, scale))
  return o.astype(v.dtype), state

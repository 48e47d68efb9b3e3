"""`gated_delta`: the gated delta rule (Gated DeltaNet), one op with three backends."""

from __future__ import annotations

import jax.numpy as jnp

from dlax.ops.common import (Impl, KERNEL_IMPLS, accumulator_dtype, check_chunk_size, check_inputs,
                             default_scale, kernel, require_beta, resolve_impl)
from dlax.ops.gated_delta.chunked import gated_delta_chunked
from dlax.ops.gated_delta.naive import (gated_delta_masked, gated_delta_recurrent,
                                        gated_delta_step_reference)


def gated_delta(q, k, v, g, beta, *, scale: float | None = None, initial_state=None,
                chunk_size: int = 64, impl: Impl = "chunked"):
  """Gated delta rule: S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ (scale q_t).

  Same semantics as fla's `recurrent_gated_delta_rule_ref`; q and k are not normalised here.

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g: `[B, T, H]` log-decay (≤ 0, α = exp g),
      float32/float64.
    beta: `[B, T, H]` write strength, usually in (0, 1).
    scale: query scale; defaults to `Dk ** -0.5`.
    initial_state: optional `[B, H, Dk, Dv]` state to continue from.
    chunk_size: C in [1, 256] for `impl="chunked"`; T need not be a multiple of C.
    impl: "chunked" (default, XLA), "recurrent" (token-by-token oracle), "masked" (O(T²)),
      "pallas_triton" / "pallas_tpu" (kernels; interpret mode on CPU), or None: the platform's
      kernel on GPU/TPU, else "chunked".

  Returns:
    (o `[B, T, H, Dv]` in v's dtype, final state `[B, H, Dk, Dv]` in fp32, or fp64 for fp64 inputs).
  """
  impl = resolve_impl("gated_delta", impl)
  require_beta("gated_delta", beta)
  check_chunk_size("gated_delta", chunk_size)
  check_inputs("gated_delta", q, k, v, g, beta=beta, initial_state=initial_state)
  scale = default_scale(q, scale)
  if impl in KERNEL_IMPLS:
    return kernel("gated_delta", impl)(q, k, v, g, beta, scale=scale, chunk_size=chunk_size,
                                       initial_state=initial_state)
  if impl == "recurrent":
    return gated_delta_recurrent(q, k, v, g, beta, scale=scale, initial_state=initial_state)
  if impl == "masked":
    return gated_delta_masked(q, k, v, g, beta, scale=scale, initial_state=initial_state)
  return gated_delta_chunked(q, k, v, g, beta, scale=scale, chunk_size=chunk_size,
                             initial_state=initial_state)


def gated_delta_step(q, k, v, g, beta, state=None, *, scale: float | None = None):
  """Single-token decode step. q, k `[B, H, Dk]`, v `[B, H, Dv]`, g, beta `[B, H]`,
  state `[B, H, Dk, Dv]` or None (zeros). Returns (o `[B, H, Dv]` in v's dtype, new state)."""
  require_beta("gated_delta_step", beta)
  check_inputs("gated_delta_step", q, k, v, g, beta=beta, initial_state=state, step=True)
  acc = accumulator_dtype(q, k, v, g, beta, state)
  if state is None:
    state = jnp.zeros((*q.shape, v.shape[-1]), acc)
  o, state = gated_delta_step_reference(q, k, v, g, beta, state.astype(acc),
                                        scale=default_scale(q, scale))
  return o.astype(v.dtype), state

"""`log_linear_attention`: Log-Linear Attention (Guo et al. 2025) on Mamba-2 or Gated DeltaNet."""

from __future__ import annotations

import jax.numpy as jnp

from dlax.ops.common import (Impl, KERNEL_IMPLS, accumulator_dtype, check_chunk_size, check_inputs,
                             is_tracer, kernel, resolve_impl)
from dlax.ops.log_linear.chunked import log_linear_chunked
from dlax.ops.log_linear.levels import LEVELS_MAX, LogLinearState, max_positions
from dlax.ops.log_linear.naive import (log_linear_masked, log_linear_recurrent,
                                       log_linear_step_reference)


def _fail(op: str, message: str):
  raise ValueError(f"{op}: {message}")


def _check_lam(op: str, lam, batch_shape: tuple[int, ...]) -> None:
  layout = "[B, H, L]" if len(batch_shape) == 2 else "[B, T, H, L]"
  if lam.ndim != len(batch_shape) + 1 or lam.shape[:-1] != batch_shape or lam.shape[-1] < 1:
    _fail(op, f"lam must have shape {batch_shape + ('L',)} ({layout}, L >= 1), got {lam.shape}")
  if not jnp.issubdtype(lam.dtype, jnp.floating):
    _fail(op, f"lam must be floating point, got {lam.dtype}")


def _check_state(op: str, state, q, v, num_tokens: int) -> None:
  """Shapes of a `LogLinearState`; for a concrete pos, that pos + T positions fit its levels."""
  if not isinstance(state, LogLinearState):
    _fail(op, f"the state must be a LogLinearState, got {type(state).__name__}")
  b, h, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
  if state.S.ndim != 5 or state.S.shape[:2] + state.S.shape[3:] != (b, h, dk, dv):
    _fail(op, f"state.S must have shape {(b, h, 'levels', dk, dv)}, got {state.S.shape}")
  if state.pos.shape != (b,) or not jnp.issubdtype(state.pos.dtype, jnp.integer):
    _fail(op, f"state.pos must be an integer array of shape {(b,)}, got {state.pos.dtype} "
          f"{state.pos.shape}")
  _check_positions(op, state.pos, num_tokens, state.levels)


def _check_positions(op: str, pos, num_tokens: int, levels: int) -> None:
  limit = max_positions(levels)
  end = num_tokens if pos is None or is_tracer(pos) else int(jnp.max(pos)) + num_tokens
  if end > limit:
    _fail(op, f"pos + T = {end} exceeds the {limit} positions that {levels} levels support")


def _check_chunk_size(op: str, chunk_size: int) -> None:
  check_chunk_size(op, chunk_size)
  if chunk_size & (chunk_size - 1):
    _fail(op, f"chunk_size must be a power of two for the Fenwick chunk cascade, got {chunk_size}")


def log_linear_attention(q, k, v, g, lam, beta=None, *, scale: float = 1.0, chunk_size: int = 64,
                         initial_state: LogLinearState | None = None, impl: Impl = "chunked"):
  """Log-Linear Attention: Fenwick-tree multi-state linear attention (spec dla.md §3).

  Token s is held at query time t in level `ℓ(t, s) = bit_length(t XOR s)` (absolute positions),
  every level evolves under the backbone's transition, and `o_t = Σ_ℓ λ_{t,ℓ} S^{(ℓ)ᵀ}(scale q_t)`.

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g: `[B, T, H]` log-decay (≤ 0), float32/float64.
    lam: `[B, T, H, L]` readout weights (≥ 0); level ℓ ≥ L uses `lam[..., L − 1]`.
    beta: `[B, T, H]` for Gated DeltaNet (transition α(I − β k kᵀ), write β k vᵀ), or None for
      Mamba-2 (transition α, write k vᵀ).
    scale: query scale.
    chunk_size: power of two C in [1, 256]; T need not be a multiple of C.
    initial_state: optional `LogLinearState` to continue from (any `pos`, per batch row).
    impl: "chunked" (default), "recurrent" (token-by-token oracle) or "masked" (O(T²), from
      position 0 only); None is "chunked" (there is no Pallas kernel for this op).

  Returns:
    (o `[B, T, H, Dv]` in v's dtype, final `LogLinearState` with S in fp32, or fp64 for fp64
    inputs, and `LEVELS_MAX` levels unless `initial_state` has another count).
  """
  op = "log_linear_attention"
  impl = resolve_impl(op, impl, "log_linear")
  _check_chunk_size(op, chunk_size)
  check_inputs(op, q, k, v, g, beta=beta)
  _check_lam(op, lam, q.shape[:-1])
  t = q.shape[1]
  if initial_state is None:
    _check_positions(op, None, t, LEVELS_MAX)
  else:
    _check_state(op, initial_state, q, v, t)
    if impl == "masked":
      _fail(op, 'impl="masked" starts at position 0 and takes no initial_state; use '
            'impl="chunked" or impl="recurrent"')
  acc = accumulator_dtype(q, k, v, g, lam, beta, None if initial_state is None else initial_state.S)
  inputs = tuple(None if x is None else x.astype(acc) for x in (q, k, v, g, lam, beta))
  if initial_state is None:
    start = LogLinearState.empty(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=acc)
  else:
    start = initial_state = LogLinearState(initial_state.S.astype(acc),
                                           initial_state.pos.astype(jnp.int32))
  scale = float(scale)
  if t == 0:
    return jnp.zeros(v.shape, v.dtype), start
  if impl == "recurrent":
    o, state = log_linear_recurrent(*inputs, start, scale=scale)
  elif impl == "masked":
    o, state = log_linear_masked(*inputs, scale=scale)
  elif impl in KERNEL_IMPLS:
    o, state = kernel("log_linear", impl)(*inputs, initial_state, scale=scale,
                                          chunk_size=chunk_size)
  else:
    o, state = log_linear_chunked(*inputs, initial_state, scale=scale, chunk_size=chunk_size)
  return o.astype(v.dtype), state


def log_linear_step(q, k, v, g, lam, state: LogLinearState, beta=None, *, scale: float = 1.0):
  """Single-token decode step; equals `log_linear_attention` on T = 1 with `initial_state=state`.

  q, k `[B, H, Dk]`, v `[B, H, Dv]`, g, beta `[B, H]`, lam `[B, H, L]`.
  Returns (o `[B, H, Dv]` in v's dtype, new `LogLinearState`).
  """
  op = "log_linear_step"
  check_inputs(op, q, k, v, g, beta=beta, step=True)
  _check_lam(op, lam, q.shape[:-1])
  _check_state(op, state, q, v, 1)
  acc = accumulator_dtype(q, k, v, g, lam, beta, state.S)
  state = LogLinearState(state.S.astype(acc), state.pos.astype(jnp.int32))
  o, state = log_linear_step_reference(q, k, v, g, lam, beta, state, scale=float(scale))
  return o.astype(v.dtype), state

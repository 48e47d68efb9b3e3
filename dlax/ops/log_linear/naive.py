"""Reference implementations of Log-Linear Attention (spec dla.md §3) on both backbones.

Recurrent form, per token t (absolute position): (1) Fenwick carry of the level states (t ≥ 1);
(2) the backbone transition A_t on every level; (3) the write w_t into level 0; (4) the read

    o_t = Σ_ℓ λ_{t, min(ℓ, L−1)} · S^{(ℓ)ᵀ} (scale · q_t).

Masked form: `o = (A_base ⊙ Λ) V` with `Λ[t, s] = λ_{t, min(ℓ(t, s), L−1)}`. Both run in the
inputs' precision promoted to at least fp32 (fp64 under x64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dlax.ops.dla.chunk_math import chunk_math
from dlax.ops.gated_delta.naive import gated_delta_attention_matrix, gated_delta_step_reference
from dlax.ops.log_linear.levels import (LEVELS_MAX, LogLinearState, bin_by_level, fenwick_carry,
                                        fenwick_levels, level_weights, where_batch)
from dlax.ops.ssd.naive import ssd_attention_matrix, ssd_step_reference


def base_step(q, k, v, g, beta, state, *, scale: float):
  """One token of the base model (Mamba-2 if beta is None, else Gated DeltaNet).

  q, k `[B, H, Dk]`, v `[B, H, Dv]`, g, beta `[B, H]`, state `[B, H, Dk, Dv]`.
  Returns (o `[B, H, Dv]`, new state), both in the state's dtype.
  """
  if beta is None:
    return ssd_step_reference(q, k, v, g, state, scale=scale)
  return gated_delta_step_reference(q, k, v, g, beta, state, scale=scale)


def base_attention_matrix(q, k, g, beta, *, scale: float):
  """A_base `[B, H, T, T]` of the base model (spec §2)."""
  if beta is None:
    return ssd_attention_matrix(q, k, g, scale=scale)
  return gated_delta_attention_matrix(q, k, g, beta, scale=scale)


def log_linear_step_reference(q, k, v, g, lam, beta, state: LogLinearState, *, scale: float):
  """One token: carry, transition every level, write level 0, weighted read.

  q, k `[B, H, Dk]`, v `[B, H, Dv]`, g, beta `[B, H]`, lam `[B, H, L]`.
  Returns (o `[B, H, Dv]` in the state's dtype, new `LogLinearState`).
  """
  num_levels = state.levels
  levels_s = fenwick_carry(state.S, state.pos)
  first = jnp.arange(num_levels) == 0
  v_per_level = v[:, :, None, :] * first[:, None].astype(v.dtype)   # w_t only into level 0
  step = functools.partial(base_step, scale=scale)
  reads, levels_s = jax.vmap(step, in_axes=(None, None, 2, None, None, 2), out_axes=2)(
      q, k, v_per_level, g, beta, levels_s)                         # reads: [B, H, L, Dv]
  weights = level_weights(lam.astype(reads.dtype), jnp.arange(num_levels))          # [B, H, L]
  o = jnp.einsum("bhl,bhlv->bhv", weights, reads)
  return o, LogLinearState(levels_s, state.pos + 1)


def log_linear_recurrent(q, k, v, g, lam, beta, state: LogLinearState, *, scale: float,
                         valid=None):
  """Token-by-token `lax.scan` of `log_linear_step_reference`.

  Inputs `[B, T, ...]`; `valid` `[B, T]` bool optionally skips tokens (state and pos unchanged).
  Returns (o `[B, T, H, Dv]` in the state's dtype, final `LogLinearState`).
  """
  def body(state, xs):
    *inputs, ok = xs
    o, new_state = log_linear_step_reference(*inputs, state, scale=scale)
    if ok is not None:
      new_state = where_batch(ok, new_state, state)
    return new_state, o

  xs = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, lam, beta, valid))
  state, o = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1), state


def log_linear_masked(q, k, v, g, lam, beta, *, scale: float, levels: int = LEVELS_MAX):
  """O(T²) masked form from position 0. Inputs `[B, T, ...]` in one float dtype.

  Returns (o `[B, T, H, Dv]`, final `LogLinearState` with `levels` levels), in that dtype.
  """
  b, t = q.shape[:2]
  positions = jnp.arange(t, dtype=jnp.int32)
  a_base = base_attention_matrix(q, k, g, beta, scale=scale)             # [B, H, T, T]
  lam_weights = level_weights(jnp.moveaxis(lam, 1, 2), fenwick_levels(positions, positions))
  o = jnp.einsum("bhts,bshv->bthv", a_base * lam_weights, v)
  # Final state: writes transported to T − 1 (K̂ of the sequence as one chunk), binned by level.
  to_heads = lambda x: None if x is None else jnp.moveaxis(x, 1, 2)      # [B, H, T, ...]
  k_hat = chunk_math(to_heads(q), to_heads(k), to_heads(g), to_heads(beta), scale=scale).k_hat
  last_levels = jnp.broadcast_to(fenwick_levels(positions[-1:], positions)[0], (b, t))
  final = LogLinearState(bin_by_level(k_hat, to_heads(v), last_levels, levels),
                         jnp.full((b,), t, jnp.int32))
  return o, final


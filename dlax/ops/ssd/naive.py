"""Reference implementations of SSD / scalar-gated linear attention (Mamba-2, fla `simple_gla`).

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

Both references run in the inputs' precision promoted to at least fp32 (fp64 under x64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlax.ops.common import accumulator_dtype, decay_matrix


def ssd_step_reference(q, k, v, g, state, *, scale: float):
  """One token of the recurrence. q, k `[B, H, Dk]`, v `[B, H, Dv]`, g `[B, H]`,
  state `[B, H, Dk, Dv]` (accumulator dtype). Returns (o `[B, H, Dv]` in acc dtype, new state)."""
  acc = state.dtype
  q, k, v, g = (x.astype(acc) for x in (q, k, v, g))
  state = jnp.exp(g)[..., None, None] * state + k[..., :, None] * v[..., None, :]
  o = jnp.einsum("bhk,bhkv->bhv", q * scale, state)
  return o, state


def ssd_recurrent(q, k, v, g, *, scale: float, initial_state=None):
  """Token-by-token `lax.scan`. Returns (o `[B, T, H, Dv]` in v's dtype, final state)."""
  b, _, h, dk = q.shape
  acc = accumulator_dtype(q, k, v, g, initial_state)
  state = (jnp.zeros((b, h, dk, v.shape[-1]), acc) if initial_state is None
           else initial_state.astype(acc))

  def body(state, xs):
    o, state = ssd_step_reference(*xs, state, scale=scale)
    return state, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g))
  state, o = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), state


def ssd_attention_matrix(q, k, g, *, scale: float):
  """`A[b, h, t, s] = scale · (q_t·k_s) · γ(s→t)` for s <= t, else 0. O(T²) memory."""
  acc = accumulator_dtype(q, k, g)
  q, k = q.astype(acc), k.astype(acc)
  gamma = decay_matrix(g.astype(acc), axis=1)                     # [B, H, T, T]
  return scale * jnp.einsum("bthk,bshk->bhts", q, k) * gamma


def ssd_masked(q, k, v, g, *, scale: float, initial_state=None):
  """O(T²) masked form `o = A V + scale·diag(γ) Q S0`. Returns (o, final state)."""
  acc = accumulator_dtype(q, k, v, g, initial_state)
  b, t, h, dk = q.shape
  s0 = (jnp.zeros((b, h, dk, v.shape[-1]), acc) if initial_state is None
        else initial_state.astype(acc))
  vv = v.astype(acc)
  cum = jnp.cumsum(g.astype(acc), axis=1)                         # [B, T, H]
  a = ssd_attention_matrix(q, k, g, scale=scale)
  o = jnp.einsum("bhts,bshv->bthv", a, vv)
  o = o + scale * jnp.einsum("bthk,bhkv->bthv", q.astype(acc) * jnp.exp(cum)[..., None], s0)
  to_end = jnp.exp(cum[:, -1:] - cum)                              # γ(s→T-1), [B, T, H]
  final = (jnp.exp(cum[:, -1])[..., None, None] * s0
           + jnp.einsum("bshk,bshv->bhkv", k.astype(acc) * to_end[..., None], vv))
  return o.astype(v.dtype), final

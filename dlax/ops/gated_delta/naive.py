"""Reference implementations of the gated delta rule (Gated DeltaNet, fla `gated_delta_rule`).

Per (batch, head), matching fla's `recurrent_gated_delta_rule_ref`:

    S ← exp(g_t) S,     u_t = β_t (v_t − Sᵀ k_t),     S ← S + k_t u_tᵀ,     o_t = Sᵀ (scale · q_t)

i.e. `S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`. No L2 norm inside: callers normalise
q and k. Both references run in the inputs' precision promoted to at least fp32 (fp64 under x64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlax.ops.common import accumulator_dtype, decay_matrix
from dlax.ops.ssd.naive import ssd_attention_matrix


def gated_delta_step_reference(q, k, v, g, beta, state, *, scale: float):
  """One token of the recurrence. q, k `[B, H, Dk]`, v `[B, H, Dv]`, g, beta `[B, H]`,
  state `[B, H, Dk, Dv]` (accumulator dtype). Returns (o `[B, H, Dv]` in acc dtype, new state)."""
  acc = state.dtype
  q, k, v, g, beta = (x.astype(acc) for x in (q, k, v, g, beta))
  state = jnp.exp(g)[..., None, None] * state
  u = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, state))
  state = state + k[..., :, None] * u[..., None, :]
  o = jnp.einsum("bhk,bhkv->bhv", q * scale, state)
  return o, state


def gated_delta_recurrent(q, k, v, g, beta, *, scale: float, initial_state=None):
  """Token-by-token `lax.scan`. Returns (o `[B, T, H, Dv]` in v's dtype, final state)."""
  b, _, h, dk = q.shape
  acc = accumulator_dtype(q, k, v, g, beta, initial_state)
  state = (jnp.zeros((b, h, dk, v.shape[-1]), acc) if initial_state is None
           else initial_state.astype(acc))

  def body(state, xs):
    o, state = gated_delta_step_reference(*xs, state, scale=scale)
    return state, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
  state, o = jax.lax.scan(body, state, xs)
  return jnp.moveaxis(o, 0, 1).astype(v.dtype), state


def delta_rule_solve(k, g, beta, rhs):
  """`Ψ rhs` with `Ψ = (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β)`, by forward substitution.

  With `rhs = V − diag(γ) K S0` this gives the pseudo-values `u_t` of the delta rule.
  k `[B, T, H, Dk]`, g, beta `[B, T, H]`, rhs `[B, H, T, X]` (all in one float dtype).
  Returns `[B, H, T, X]`.
  """
  t = k.shape[1]
  beta = jnp.moveaxis(beta, 1, 2)[..., None]                      # [B, H, T, 1]
  gram = jnp.einsum("bthk,bshk->bhts", k, k) * decay_matrix(g, axis=1)
  lower = jnp.eye(t, dtype=gram.dtype) + jnp.tril(beta * gram, k=-1)
  return jax.scipy.linalg.solve_triangular(lower, beta * rhs, lower=True, unit_diagonal=True)


def gated_delta_attention_matrix(q, k, g, beta, *, scale: float):
  """`A[b, h, t, s] = scale · β_s q_tᵀ Φ_{s→t} k_s` for s <= t, else 0, as `A = P Ψ`. O(T²) memory.

  q, k `[B, T, H, Dk]`, g, beta `[B, T, H]`. Returns `[B, H, T, T]` in the accumulator dtype.
  """
  acc = accumulator_dtype(q, k, g, beta)
  q, k, g, beta = (x.astype(acc) for x in (q, k, g, beta))
  scores = ssd_attention_matrix(q, k, g, scale=scale)             # P = scale (Q Kᵀ) ⊙ Γ ⊙ tril_incl
  eye = jnp.broadcast_to(jnp.eye(q.shape[1], dtype=acc), scores.shape)
  return scores @ delta_rule_solve(k, g, beta, eye)


def gated_delta_masked(q, k, v, g, beta, *, scale: float, initial_state=None):
  """O(T²) masked form `o = A V + Q̃ S0`, `Q̃ = scale·diag(γ) Q − A diag(γ) K`.

  Returns (o `[B, T, H, Dv]` in v's dtype, final state
  `γ_{T−1} S0 + (diag(γ(s→T−1)) K)ᵀ Ψ (V − diag(γ) K S0)`).
  """
  acc = accumulator_dtype(q, k, v, g, beta, initial_state)
  out_dtype = v.dtype
  b, t, h, dk = q.shape
  s0 = (jnp.zeros((b, h, dk, v.shape[-1]), acc) if initial_state is None
        else initial_state.astype(acc))
  q, k, v, g, beta = (x.astype(acc) for x in (q, k, v, g, beta))
  cum = jnp.cumsum(g, axis=1)                                     # [B, T, H]
  k_decayed = k * jnp.exp(cum)[..., None]                         # diag(γ) K
  a = gated_delta_attention_matrix(q, k, g, beta, scale=scale)
  q_tilde = scale * q * jnp.exp(cum)[..., None] - jnp.einsum("bhts,bshk->bthk", a, k_decayed)
  o = jnp.einsum("bhts,bshv->bthv", a, v) + jnp.einsum("bthk,bhkv->bthv", q_tilde, s0)
  rhs = v - jnp.einsum("bthk,bhkv->bthv", k_decayed, s0)
  u = delta_rule_solve(k, g, beta, jnp.moveaxis(rhs, 1, 2))      # [B, H, T, Dv]
  to_end = jnp.exp(cum[:, -1:] - cum)                              # γ(s→T-1), [B, T, H]
  final = (jnp.exp(cum[:, -1])[..., None, None] * s0
           + jnp.einsum("bshk,bhsv->bhkv", k * to_end[..., None], u))
  return o.astype(out_dtype), final

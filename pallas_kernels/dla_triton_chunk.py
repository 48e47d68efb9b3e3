"""Per-chunk quantities of chunked DLA (spec dla.md §7.1, §6.3), in XLA, for the DLA kernels.

A port of `dlax.ops.dla.chunk_math` (kernels may not import dlax). One chunk of C tokens, local
index i, leading axes `...` (here (B, H, N)). With the inclusive cumulative log-decay `G_i`,
`γ_i = exp(G_i)`, `γ′_i = exp(G_{i−1})` (γ′_0 = 1), `Γ[i,s] = exp(G_i − G_s)` for s ≤ i (a masked
segment sum) and `Γ′[i,s] = Γ[i−1,s]` for s < i:

    Ψ   = I (Mamba-2, δ = 0);  GDN (δ = 1): (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β)
    A_in = scale·((Q Kᵀ) ⊙ Γ) Ψ              [C, C]   q_i's read of token s's write
    A_kk = ((K Kᵀ) ⊙ Γ′) Ψ                   [C, C]   k_i's response to token s's write (before i)
    Q̃ = scale·diag(γ)Q − δ A_in diag(γ)K     [C, Dk]  read of a pre-chunk state S: (Q̃ S)_i
    K̃′ = diag(γ′)K − δ A_kk diag(γ)K         [C, Dk]  key response of a pre-chunk state
    K̂ = Ψᵀ diag(Γ[C−1, :]) K                 [C, Dk]  token s's write at the chunk end: K̂[s] v_sᵀ
    F S = γ_{C−1} S − δ K̂ᵀ (diag(γ) K S)             a pre-chunk state carried to the chunk end

With segment resets, every pair term is masked to the same segment and Q̃, K̃′ are zero from the
first reset on. Everything here is plain, differentiable XLA (JAX autodiff gives its backward).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ChunkMath(NamedTuple):
  """State-free quantities of every chunk (module docstring); leading axes `...`.

  carry `[..., C]` bool: token i still continues the pre-chunk state (no reset up to i).
  k_gamma: diag(γ) K for GDN, None for Mamba-2. end_decay `[...]`: γ_{C−1}.
  """

  carry: jax.Array
  a_in: jax.Array
  a_kk: jax.Array
  q_tilde: jax.Array
  k_tilde: jax.Array
  k_hat: jax.Array
  k_gamma: jax.Array | None
  end_decay: jax.Array


def _decay_matrix(g):
  """`Γ[..., i, s] = exp(Σ_{r=s+1..i} g_r)` for s ≤ i, else 0, from a masked cumulative sum."""
  c = g.shape[-1]
  strict = jnp.tril(jnp.ones((c, c), bool), k=-1)
  sums = jnp.cumsum(jnp.where(strict, g[..., :, None], 0.0), axis=-2)
  return jnp.where(jnp.tril(jnp.ones((c, c), bool)), jnp.exp(sums), 0.0)


def _shift_down(x, axis: int, fill):
  """`out[i] = x[i − 1]` along `axis`, `out[0] = fill`."""
  x = jnp.moveaxis(x, axis, 0)
  x = jnp.concatenate([jnp.full_like(x[:1], fill), x[:-1]], axis=0)
  return jnp.moveaxis(x, 0, axis)


def _delta_rule_inverse(k, decay, beta):
  """Ψ = (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β), by forward substitution."""
  c = k.shape[-2]
  eye = jnp.eye(c, dtype=k.dtype)
  gram = jnp.einsum("...ik,...sk->...is", k, k) * decay
  lower = eye + jnp.tril(beta[..., :, None] * gram, k=-1)
  rhs = jnp.broadcast_to(eye * beta[..., None, :], lower.shape)
  return jax.scipy.linalg.solve_triangular(lower, rhs, lower=True, unit_diagonal=True)


def chunk_math(q, k, g, beta=None, resets=None, *, scale: float) -> ChunkMath:
  """q, k `[..., C, Dk]`, g (and beta) `[..., C]`, resets `[..., C]` bool (broadcasting)."""
  gamma = jnp.exp(jnp.cumsum(g, axis=-1))
  gamma_prev = _shift_down(gamma, -1, 1.0)
  decay = _decay_matrix(g)
  decay_prev = _shift_down(decay, -2, 0.0)
  carry = jnp.ones(g.shape, bool)
  if resets is not None:
    segment = jnp.cumsum(resets, axis=-1)
    carry = jnp.broadcast_to(segment == 0, g.shape)
    same = segment[..., :, None] == segment[..., None, :]
    decay = jnp.where(same, decay, 0.0)
    decay_prev = jnp.where(same, decay_prev, 0.0)

  a_in = scale * jnp.einsum("...ik,...sk->...is", q, k) * decay
  a_kk = jnp.einsum("...ik,...sk->...is", k, k) * decay_prev
  q_tilde = scale * gamma[..., None] * q
  k_tilde = gamma_prev[..., None] * k
  k_hat = decay[..., -1, :, None] * k
  k_gamma = None
  if beta is not None:
    psi = _delta_rule_inverse(k, decay, beta)
    a_in, a_kk = a_in @ psi, a_kk @ psi
    k_hat = jnp.swapaxes(psi, -1, -2) @ k_hat
    k_gamma = gamma[..., None] * k
    q_tilde = q_tilde - a_in @ k_gamma
    k_tilde = k_tilde - a_kk @ k_gamma
  q_tilde = jnp.where(carry[..., None], q_tilde, 0.0)
  k_tilde = jnp.where(carry[..., None], k_tilde, 0.0)
  return ChunkMath(carry=carry, a_in=a_in, a_kk=a_kk, q_tilde=q_tilde, k_tilde=k_tilde,
                   k_hat=k_hat, k_gamma=k_gamma, end_decay=gamma[..., -1])


def transport(cm: ChunkMath, state):
  """`F S` for states `[..., Dk, Dv]` (leading axes as cm's, without C)."""
  out = cm.end_decay[..., None, None] * state
  if cm.k_gamma is None:
    return out
  response = jnp.einsum("...ck,...kv->...cv", cm.k_gamma, state)
  return out - jnp.einsum("...ck,...cv->...kv", cm.k_hat, response)

"""Per-chunk quantities of chunked DLA for both backbones (spec dla.md §7.1, §6.3).

One chunk of C tokens, local index i, leading batch axes `...` (e.g. (B, H)). With the inclusive
cumulative log-decay `G_i`, `γ_i = exp(G_i)`, `γ′_i = exp(G_{i−1})` (γ′_0 = 1),
`Γ[i,s] = exp(G_i − G_s)` for s ≤ i (a masked segment sum), `Γ′[i,s] = Γ[i−1,s]` for s < i, and

    Ψ = I                                                   (Mamba-2, δ = 0)
    Ψ = (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β)   (GDN, δ = 1; forward substitution)

the chunk is summarised by

    A_in = scale·((Q Kᵀ) ⊙ Γ) Ψ           [C, C]   q_i's read of token s's write (after token i)
    A_kk = ((K Kᵀ) ⊙ Γ′) Ψ                [C, C]   k_i's response to token s's write (before i)
    Q̃ = scale·diag(γ)Q − δ A_in diag(γ)K  [C, Dk]  read of a pre-chunk state S: (Q̃ S)_i
    K̃′ = diag(γ′)K − δ A_kk diag(γ)K      [C, Dk]  key response of a pre-chunk state: (K̃′ S)_i
    K̂ = Ψᵀ diag(Γ[C−1, :]) K              [C, Dk]  token s's write at the chunk end: K̂[s] v_sᵀ
    F S = γ_{C−1} S − δ K̂ᵀ (diag(γ) K S)           a pre-chunk state at the chunk end

Every slot of the DLA cache evolves under the same transition as the base state, so these
matrices serve all slots at once. With segment resets, every pair term is masked to the same
segment and Q̃, K̃′ are zero from the first reset on (the pre-chunk state is gone).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dlax.ops.common import decay_matrix


class ChunkMath(NamedTuple):
  """State-free quantities of one chunk (see the module docstring); leading axes `...`.

  Attributes:
    gamma: `[..., C]` γ_i, decay from the chunk start through token i.
    carry: `[..., C]` bool, token i still continues the pre-chunk state (no reset up to i).
    a_in: `[..., C, C]` A_in (lower triangular, diagonal included).
    a_kk: `[..., C, C]` A_kk (strictly lower triangular).
    q_tilde: `[..., C, Dk]` Q̃ (zero where not `carry`).
    k_tilde: `[..., C, Dk]` K̃′ (zero where not `carry`).
    k_hat: `[..., C, Dk]` K̂.
    k_gamma: `[..., C, Dk]` diag(γ) K for GDN, None for Mamba-2 (δ = 0).
    end_decay: `[...]` γ_{C−1}.
  """

  gamma: jax.Array
  carry: jax.Array
  a_in: jax.Array
  a_kk: jax.Array
  q_tilde: jax.Array
  k_tilde: jax.Array
  k_hat: jax.Array
  k_gamma: jax.Array | None
  end_decay: jax.Array


def _shift_down(x, axis: int, fill):
  """`out[i] = x[i − 1]` along `axis`, `out[0] = fill`."""
  x = jnp.moveaxis(x, axis, 0)
  x = jnp.concatenate([jnp.full_like(x[:1], fill), x[:-1]], axis=0)
  return jnp.moveaxis(x, 0, axis)


def delta_rule_inverse(k, decay, beta):
  """Ψ = (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β).

  k `[..., C, Dk]`, decay (Γ, already segment-masked) `[..., C, C]`, beta `[..., C]`.
  Returns `[..., C, C]` (lower triangular).
  """
  c = k.shape[-2]
  gram = jnp.einsum("...ik,...sk->...is", k, k) * decay
  lower = jnp.eye(c, dtype=k.dtype) + jnp.tril(beta[..., :, None] * gram, k=-1)
  rhs = jnp.broadcast_to(jnp.eye(c, dtype=k.dtype) * beta[..., None, :], lower.shape)
  return jax.scipy.linalg.solve_triangular(lower, rhs, lower=True, unit_diagonal=True)


def chunk_math(q, k, g, beta=None, resets=None, *, scale: float) -> ChunkMath:
  """Per-chunk quantities (§7.1).

  Args:
    q, k: `[..., C, Dk]`.
    g: `[..., C]` log-decays.
    beta: `[..., C]` for GDN, or None for Mamba-2.
    resets: optional `[..., C]` bool, token i starts a new segment (broadcasts against g).
    scale: query scale.

  Returns:
    `ChunkMath`, in the dtype of the inputs.
  """
  log_gamma = jnp.cumsum(g, axis=-1)                                   # G
  gamma = jnp.exp(log_gamma)
  gamma_prev = _shift_down(gamma, -1, 1.0)                             # γ′
  decay = decay_matrix(g)                                              # Γ [..., C, C]
  decay_prev = _shift_down(decay, -2, 0.0)                             # Γ′ (strictly lower)
  if resets is None:
    carry = jnp.ones(g.shape, bool)
  else:
    segment = jnp.cumsum(resets, axis=-1)
    carry = jnp.broadcast_to(segment == 0, g.shape)
    same = segment[..., :, None] == segment[..., None, :]
    decay = jnp.where(same, decay, 0.0)
    decay_prev = jnp.where(same, decay_prev, 0.0)
  to_end = decay[..., -1, :]                                           # Γ[C−1, s]

  a_in = scale * jnp.einsum("...ik,...sk->...is", q, k) * decay
  a_kk = jnp.einsum("...ik,...sk->...is", k, k) * decay_prev
  q_tilde = scale * gamma[..., None] * q
  k_tilde = gamma_prev[..., None] * k
  k_hat = to_end[..., None] * k
  k_gamma = None
  if beta is not None:
    psi = delta_rule_inverse(k, decay, beta)
    a_in = a_in @ psi
    a_kk = a_kk @ psi
    k_hat = jnp.swapaxes(psi, -1, -2) @ k_hat
    k_gamma = gamma[..., None] * k
    q_tilde = q_tilde - a_in @ k_gamma
    k_tilde = k_tilde - a_kk @ k_gamma
  q_tilde = jnp.where(carry[..., None], q_tilde, 0.0)
  k_tilde = jnp.where(carry[..., None], k_tilde, 0.0)
  return ChunkMath(gamma=gamma, carry=carry, a_in=a_in, a_kk=a_kk, q_tilde=q_tilde,
                   k_tilde=k_tilde, k_hat=k_hat, k_gamma=k_gamma, end_decay=gamma[..., -1])


def transport(cm: ChunkMath, states):
  """`F S` for a stack of pre-chunk states `[..., J, Dk, Dv]` -> `[..., J, Dk, Dv]`."""
  out = cm.end_decay[..., None, None, None] * states
  if cm.k_gamma is None:
    return out
  response = jnp.einsum("...ck,...jkv->...jcv", cm.k_gamma, states)   # diag(γ) K S_j
  return out - jnp.einsum("...ck,...jcv->...jkv", cm.k_hat, response)


def weighted_read(rows, states, weights):
  """`o_i = Σ_j weights[i, j] · (X S_j)_i` for transported rows X (e.g. Q̃).

  rows `[..., C, Dk]`, states `[..., J, Dk, Dv]`, weights `[..., C, J]` -> `[..., C, Dv]`. The
  reads are one `[C, Dk]·[Dk, J·Dv]` matmul, then a weighted row sum.
  """
  reads = jnp.einsum("...ik,...jkv->...ijv", rows, states)
  return jnp.einsum("...ij,...ijv->...iv", weights, reads)

"""Chunked gated delta rule (WY/UT form): a `lax.scan` over chunks carrying the fp32 state.

Per chunk (local index i, cumulative log-decay G_i within the chunk, γ = exp G,
Γ[i,s] = exp(G_i − G_s), Ψ = (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β)):

    [U' | W] = Ψ [V | diag(γ) K]                                      (state-free, batched)
    U        = U' − W S0                                              (pseudo-values, in the scan)
    S_next   = γ_{C−1} S0 + (diag(exp(G_{C−1} − G)) K)ᵀ U              (in the scan)
    o_c      = scale · diag(γ) Q S0 + (scale · Q Kᵀ ⊙ Γ ⊙ tril) U      (batched after the scan)

Only the two state-dependent products run sequentially; everything else is batched over chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlax.ops.common import accumulator_dtype, from_chunks, pad_time, to_chunks
from dlax.ops.gated_delta.naive import delta_rule_solve
from dlax.ops.ssd.naive import ssd_attention_matrix


def gated_delta_chunked(q, k, v, g, beta, *, scale: float, chunk_size: int, initial_state=None):
  """Returns (o `[B, T, H, Dv]` in v's dtype, final state `[B, H, Dk, Dv]`)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  acc = accumulator_dtype(q, k, v, g, beta, initial_state)
  out_dtype = v.dtype
  c = chunk_size
  q, k, v, g, beta = (to_chunks(pad_time(x.astype(acc), c), c)      # [N, B, C, ...]
                      for x in (q, k, v, g, beta))
  n = q.shape[0]

  def merge_chunks(x):                                                 # [N, B, ...] -> [N·B, ...]
    return x.reshape(n * b, *x.shape[2:])

  def split_chunks(x):                                                  # [N·B, ...] -> [N, B, ...]
    return x.reshape(n, b, *x.shape[1:])

  cum = jnp.cumsum(g, axis=2)                                       # [N, B, C, H]
  gamma = jnp.exp(cum)
  rhs = jnp.moveaxis(jnp.concatenate([v, k * gamma[..., None]], axis=-1), 2, 3)  # [N,B,H,C,Dv+Dk]
  k_, g_, beta_, rhs_ = (merge_chunks(x) for x in (k, g, beta, rhs))
  solved = split_chunks(delta_rule_solve(k_, g_, beta_, rhs_))
  u_free, w = solved[..., :dv], solved[..., dv:]                    # U', W: [N, B, H, C, ·]
  k_end = k * jnp.exp(cum[:, :, -1:] - cum)[..., None]              # K_e: [N, B, C, H, Dk]
  chunk_decay = gamma[:, :, -1]                                     # [N, B, H]

  def step(state, xs):
    decay, k_end, u_free, w = xs
    u = u_free - jnp.einsum("bhck,bhkv->bhcv", w, state)
    new_state = decay[..., None, None] * state + jnp.einsum("bchk,bhcv->bhkv", k_end, u)
    return new_state, (state, u)

  s0 = jnp.zeros((b, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
  final, (starts, u) = jax.lax.scan(step, s0, (chunk_decay, k_end, u_free, w))

  scores = split_chunks(ssd_attention_matrix(merge_chunks(q), k_, g_, scale=scale))  # P
  o = jnp.einsum("nbhis,nbhsv->nbihv", scores, u)
  o = o + scale * jnp.einsum("nbihk,nbhkv->nbihv", q * gamma[..., None], starts)
  return from_chunks(o)[:, :t].astype(out_dtype), final

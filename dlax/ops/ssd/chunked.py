"""Chunked SSD: a `lax.scan` over chunks carrying the `[B, H, Dk, Dv]` state in fp32.

Per chunk (local index i, cumulative log-decay G_i within the chunk, Γ[i,s] = exp(G_i − G_s)):

    o_c     = (scale · Q Kᵀ ⊙ Γ ⊙ tril) V + scale · diag(exp G) Q S0          (intra + inter)
    S_next  = exp(G_{C−1}) S0 + (diag(exp(G_{C−1} − G)) K)ᵀ V

Only the state recurrence is sequential; the intra-chunk term and the inter-chunk read are batched
over all chunks after the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlax.ops.common import accumulator_dtype, decay_matrix, from_chunks, pad_time, to_chunks


def ssd_chunked(q, k, v, g, *, scale: float, chunk_size: int, initial_state=None):
  """Returns (o `[B, T, H, Dv]` in v's dtype, final state `[B, H, Dk, Dv]`)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  acc = accumulator_dtype(q, k, v, g, initial_state)
  out_dtype = v.dtype
  c = chunk_size
  q, k, v, g = (to_chunks(pad_time(x.astype(acc), c), c) for x in (q, k, v, g))  # [N, B, C, ...]
  cum = jnp.cumsum(g, axis=2)                                      # [N, B, C, H]
  to_end = jnp.exp(cum[:, :, -1:] - cum)                           # γ(s → chunk end)
  k_end = k * to_end[..., None]
  chunk_decay = jnp.exp(cum[:, :, -1])                             # [N, B, H]
  chunk_update = jnp.einsum("nbshk,nbshv->nbhkv", k_end, v)        # [N, B, H, Dk, Dv]

  def step(state, xs):
    decay, update = xs
    return decay[..., None, None] * state + update, state

  s0 = jnp.zeros((b, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
  final, starts = jax.lax.scan(step, s0, (chunk_decay, chunk_update))  # starts: state entering chunk

  gamma = decay_matrix(g, axis=2)                        # [N, B, H, C, C]
  scores = scale * jnp.einsum("nbihk,nbshk->nbhis", q, k) * gamma
  o = jnp.einsum("nbhis,nbshv->nbihv", scores, v)
  o = o + scale * jnp.einsum("nbihk,nbhkv->nbihv", q * jnp.exp(cum)[..., None], starts)
  return from_chunks(o)[:, :t].astype(out_dtype), final

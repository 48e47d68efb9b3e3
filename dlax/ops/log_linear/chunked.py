"""Chunked Log-Linear Attention: a `lax.scan` over chunks carrying chunk-level Fenwick states.

With C = 2^p and chunks aligned to absolute multiples of C, a token t of chunk n and a token s of
an earlier chunk m have level `ℓ(t, s) = p + ℓ(n, m)`, while tokens of one chunk have levels ≤ p.
So the chunk-level states `H_j` (j = 0 holds the previous chunk, j ≥ 1 the token level p + j) obey
the token-level cascade on chunk indices. Per chunk n, with the per-chunk quantities of
`dla.chunk_math` (A_in, transported queries Q̃, K̂ and the transport F):

    H     ← carry(H, n)                                        (chunk-level binary counter)
    o     = (A_in ⊙ Λ_in) V + Σ_{j≥1} λ_{·, min(p+j, L−1)} ⊙ (Q̃ H_j),   Λ_in[i,s] = λ_{i, ℓ(i,s)}
    H_j   ← F H_j (every level),   H_0 += K̂ᵀ V

The intra-chunk term is batched over all chunks; only the level states are sequential.

A state whose position is not a multiple of C first runs its (−pos mod C) head tokens with the
recurrent step, per batch row; the rest is shifted per row to start at a chunk boundary. The tail
is padded with identity tokens (g = 0, k = v = 0). The final chunk-level states are converted back
to token levels, so chunked and recurrent final states agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlax.ops.common import from_chunks, pad_time, to_chunks
from dlax.ops.dla.chunk_math import chunk_math, transport, weighted_read
from dlax.ops.log_linear.levels import (LEVELS_MAX, LogLinearState, bin_by_level, fenwick_carry,
                                        fenwick_level, fenwick_levels, level_weights, where_batch)
from dlax.ops.log_linear.naive import log_linear_recurrent


def _maybe(fn, x):
  return None if x is None else fn(x)


def _shift_time(x, offset):
  """`out[b, j] = x[b, j + offset_b]`, zero where that index is outside [0, T). x `[B, T, ...]`."""
  t = x.shape[1]
  index = jnp.arange(t)[None, :] + offset[:, None]                          # [B, T]
  inside = (index >= 0) & (index < t)
  expand = lambda a: a.reshape(a.shape + (1,) * (x.ndim - 2))
  out = jnp.take_along_axis(x, expand(jnp.clip(index, 0, t - 1)), axis=1)
  return jnp.where(expand(inside), out, 0)


def _to_chunk_heads(x, c: int):
  """`[B, T, H, ...]` -> `[N, B, H, C, ...]` (tail zero-padded)."""
  return jnp.moveaxis(to_chunks(pad_time(x, c), c), 2, 3)


def _run_head(inputs, state: LogLinearState, *, scale: float, chunk_size: int):
  """Runs each row's first `lead = min(−pos mod C, T)` tokens with the recurrent step.

  Returns (o_head `[B, T, H, Dv]`, zero past `lead`; state at a chunk boundary or at the end;
  lead `[B]`).
  """
  t = inputs[0].shape[1]
  head = min(chunk_size - 1, t)
  lead = jnp.minimum(-state.pos % chunk_size, t)
  in_head = jnp.arange(head)[None, :] < lead[:, None]                       # [B, head]
  o, state = log_linear_recurrent(*(_maybe(lambda x: x[:, :head], x) for x in inputs), state,
                                  scale=scale, valid=in_head)
  o = jnp.where(in_head[..., None, None], o, 0.0)
  return jnp.pad(o, [(0, 0), (0, t - head), (0, 0), (0, 0)]), state, lead


def _to_chunk_levels(token_states, p: int, num_chunk_levels: int):
  """Token-level states at a chunk boundary -> chunk levels: H_0 = Σ_{ℓ≤p} S_ℓ, H_j = S_{p+j}."""
  recent = jnp.sum(token_states[:, :, :p + 1], axis=2, keepdims=True)
  return jnp.concatenate([recent, token_states[:, :, p + 1:p + num_chunk_levels]], axis=2)


def _aligned_scan(q, k, v, g, lam, beta, state: LogLinearState, num_tokens, *, scale: float,
                  chunk_size: int, num_chunk_levels: int):
  """Chunked form of `num_tokens [B]` tokens from a chunk-aligned `state`. Inputs `[B, T, ...]`.

  Returns (o `[B, T, H, Dv]`, final token-level `S` `[B, H, levels, Dk, Dv]`).
  """
  b, t = q.shape[:2]
  c = chunk_size
  p = c.bit_length() - 1
  q, k, v, g, lam, beta = (_maybe(lambda x: _to_chunk_heads(x, c), x)
                           for x in (q, k, v, g, lam, beta))               # [N, B, H, C, ...]
  n = q.shape[0]
  cm = chunk_math(q, k, g, beta, scale=scale)
  local = jnp.arange(c, dtype=jnp.int32)
  o_intra = jnp.einsum("nbhis,nbhsv->nbhiv",
                       cm.a_in * level_weights(lam, fenwick_levels(local, local)), v)

  older_levels = p + jnp.arange(1, num_chunk_levels, dtype=jnp.int32)      # token level of H_j
  chunk_index = state.pos[None, :] // c + jnp.arange(n, dtype=jnp.int32)[:, None]   # [N, B]
  active = jnp.arange(n)[:, None] * c < num_tokens[None, :]                  # [N, B]

  def step(levels, xs):
    index, active, lam, v, cm = xs
    levels_in = fenwick_carry(levels, index)
    o = weighted_read(cm.q_tilde, levels_in[:, :, 1:], level_weights(lam, older_levels))
    levels_out = transport(cm, levels_in)
    levels_out = levels_out.at[:, :, 0].add(jnp.einsum("bhsk,bhsv->bhkv", cm.k_hat, v))
    return where_batch(active, levels_out, levels), o

  scan_math = cm._replace(gamma=None, carry=None, a_in=None, a_kk=None, k_tilde=None)
  levels0 = _to_chunk_levels(state.S, p, num_chunk_levels)
  levels, o_inter = jax.lax.scan(step, levels0, (chunk_index, active, lam, v, scan_math))
  o = from_chunks(jnp.moveaxis(o_intra + o_inter, 3, 2))[:, :t]

  # Token levels 0..p: the last chunk's tokens binned by ℓ(last, s); level p + j: H_j.
  last = jnp.maximum(num_tokens - 1, 0)
  last_chunk, last_local = last // c, last % c
  rows = jnp.arange(b)
  local_levels = fenwick_level(last_local[:, None], local[None, :])
  local_levels = jnp.where(local[None, :] <= last_local[:, None], local_levels, -1)
  recent = bin_by_level(cm.k_hat[last_chunk, rows], v[last_chunk, rows], local_levels, p + 1)
  token_states = jnp.concatenate([recent, levels[:, :, 1:]], axis=2)
  pad = state.levels - token_states.shape[2]
  token_states = jnp.pad(token_states, [(0, 0), (0, 0), (0, pad), (0, 0), (0, 0)])
  return o, where_batch(num_tokens > 0, token_states, state.S)


def log_linear_chunked(q, k, v, g, lam, beta, initial_state: LogLinearState | None, *,
                       scale: float, chunk_size: int):
  """Chunked Log-Linear Attention. Inputs `[B, T, ...]` in one float dtype; C a power of two.

  Without `initial_state` the sequence starts at position 0 and the chunk cascade only needs the
  levels of T tokens; with one, every level may be occupied. Returns (o `[B, T, H, Dv]`, final
  `LogLinearState` with as many levels as `initial_state`, else `LEVELS_MAX`).
  """
  b, t, h, dk = q.shape
  c = chunk_size
  inputs = (q, k, v, g, lam, beta)
  o_head, lead = None, jnp.zeros((b,), jnp.int32)
  if initial_state is None:
    state = LogLinearState.empty(b, h, dk, v.shape[-1], LEVELS_MAX, q.dtype)
    num_chunk_levels = 1 + (-(-t // c) - 1).bit_length()                    # ℓ(n, m) for n, m < N
  else:
    state = initial_state
    num_chunk_levels = state.levels - (c.bit_length() - 1)                  # every token level > p
    if c > 1:
      o_head, state, lead = _run_head(inputs, state, scale=scale, chunk_size=c)
      inputs = tuple(_maybe(lambda x: _shift_time(x, lead), x) for x in inputs)
  num_tokens = t - lead
  o, final_s = _aligned_scan(*inputs, state, num_tokens, scale=scale, chunk_size=c,
                             num_chunk_levels=num_chunk_levels)
  if o_head is not None:
    o = o_head + _shift_time(o, -lead)
  return o, LogLinearState(final_s, state.pos + num_tokens)

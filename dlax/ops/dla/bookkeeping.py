"""Scalar block bookkeeping of DLA (spec dla.md §4.4, §4.7): merges, block starts, rank maps.

Everything here acts on integer/scalar slot metadata only (no `[Dk, Dv]` states), so the same
helpers serve the recurrent step, the masked reference, the chunked path and the tests.

Slot layout: `[..., K]` arrays, slot 0 = oldest, slot m−1 = open, slots ≥ m unused (zero).
A merge index `i` combines the adjacent slots (i, i+1); −1 means "no merge".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_index(n, info):
  """Least-dense adjacent pair `argmin_i (Ī_i + Ī_{i+1}) / (n_i + n_{i+1})`, ties → oldest.

  n, info `[..., K]` (a full cache). Returns `[...]` int32 in 0..K−2.
  """
  pair_n = (n[..., :-1] + n[..., 1:]).astype(info.dtype)
  pair_info = info[..., :-1] + info[..., 1:]
  density = jnp.where(pair_n > 0, pair_info / jnp.where(pair_n > 0, pair_n, 1), jnp.inf)
  return jnp.argmin(density, axis=-1).astype(jnp.int32)


def merge_adjacent(x, merge_idx, *, axis: int = -1, combine: bool = True):
  """Merges slots (i, i+1) of `x` along `axis` and shifts the later slots down by one.

  The merged slot is `x_i + x_{i+1}` (`combine=True`, for states, n and Ī) or keeps `x_i`
  (`combine=False`, for block starts). The freed last slot becomes zero. `merge_idx` has the
  shape of `x` without `axis`; values outside 0..K−2 (e.g. −1) leave `x` unchanged.
  """
  x = jnp.moveaxis(x, axis, -1)
  k = x.shape[-1]
  slots = jnp.arange(k)
  idx = merge_idx.reshape(merge_idx.shape + (1,) * (x.ndim - merge_idx.ndim))
  idx = jnp.where((idx >= 0) & (idx < k - 1), idx, k)                # k: no merge
  src = jnp.broadcast_to(slots + (slots > idx), x.shape)             # source slot of each slot
  out = jnp.where(src < k, jnp.take_along_axis(x, jnp.minimum(src, k - 1), axis=-1), 0)
  if combine:
    partner = jnp.take_along_axis(x, jnp.broadcast_to(jnp.minimum(idx + 1, k - 1), x.shape), -1)
    out = out + jnp.where(slots == idx, partner, 0)
  return jnp.moveaxis(out.astype(x.dtype), -1, axis)


def take_slot(x, index):
  """`x[b, h, index[b, h]]` for `x [B, H, K, ...]` and `index [B, H]` (clipped to 0..K−1)."""
  index = jnp.clip(index, 0, x.shape[2] - 1)
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=2)[:, :, 0]


def legalize(boundary, merge_idx, m, capacity: int):
  """Makes (boundary, merge_idx) structurally valid for a cache holding `m` slots.

  A token meeting an empty cache is always a boundary; a merge happens iff `b = 1` and
  `m = K`, at `merge_idx` clipped to 0..K−2 (−1 otherwise). All arguments `[...]`.
  """
  boundary = boundary.astype(bool) | (m == 0)
  merges = boundary & (m == capacity)
  return boundary, jnp.where(merges, jnp.clip(merge_idx, 0, capacity - 2), -1).astype(jnp.int32)


def advance_blocks(lo, m, pos, boundary, merge_idx):
  """One token of block bookkeeping with a legal decision (see `legalize`).

  Args:
    lo: `[..., K]` int32 block starts. m: `[...]` int32 live slots.
    pos: absolute position of the token, broadcastable to `m`.
    boundary: `[...]` bool. merge_idx: `[...]` int32 (−1: no merge).

  Returns:
    (lo, m, slot): updated starts and count, and the slot that receives the token's write
    (the appended slot if `boundary`, else the open slot).
  """
  lo = merge_adjacent(lo, merge_idx, combine=False)
  m = m - (merge_idx >= 0).astype(m.dtype)
  slot = jnp.where(boundary, m, m - 1)
  append = boundary[..., None] & (jnp.arange(lo.shape[-1]) == slot[..., None])
  lo = jnp.where(append, jnp.broadcast_to(jnp.asarray(pos, lo.dtype), m.shape)[..., None], lo)
  return lo, m + boundary.astype(m.dtype), slot


def segment_resets(segment_ids):
  """`[B, T]` bool: the token starts a new segment (its id differs from the previous token's).

  The first token of a call never resets (it continues the initial cache).
  """
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def same_segment(segment_ids):
  """`[B, T, T]` bool: tokens t and s lie in the same contiguous segment."""
  index = jnp.cumsum(segment_resets(segment_ids), axis=1)
  return index[:, :, None] == index[:, None, :]


def replay_blocks(boundary, merge_idx, *, capacity: int, resets=None, lo0=None, m0=None,
                  pos0=None):
  """Replays decisions into the per-step block layout.

  Args:
    boundary, merge_idx: `[B, T, H]` decisions (legalised step by step, see `legalize`).
    capacity: K.
    resets: optional `[B, T]` bool; the cache is emptied before such a token.
    lo0, m0: optional initial `[B, H, K]` starts and `[B, H]` counts (default: empty cache).
    pos0: optional `[B]` absolute position of token 0 (default 0).

  Returns:
    (lo_t `[B, T, H, K]`, m_t `[B, T, H]`, boundary, merge_idx): the layout after each step and
    the legal decisions that produced it.
  """
  b, t, h = boundary.shape
  lo = jnp.zeros((b, h, capacity), jnp.int32) if lo0 is None else lo0.astype(jnp.int32)
  m = jnp.zeros((b, h), jnp.int32) if m0 is None else m0.astype(jnp.int32)
  pos0 = jnp.zeros((b,), jnp.int32) if pos0 is None else pos0.astype(jnp.int32)
  resets = jnp.zeros((b, t), bool) if resets is None else resets

  def step(carry, xs):
    lo, m = carry
    pos, reset, b_t, idx_t = xs
    lo = jnp.where(reset[:, None, None], 0, lo)
    m = jnp.where(reset[:, None], 0, m)
    b_t, idx_t = legalize(b_t, idx_t, m, capacity)
    lo, m, _ = advance_blocks(lo, m, pos[:, None], b_t, idx_t)
    return (lo, m), (lo, m, b_t, idx_t)

  positions = pos0[None, :] + jnp.arange(t, dtype=jnp.int32)[:, None]      # [T, B]
  xs = (positions, resets.T, jnp.moveaxis(boundary, 1, 0), jnp.moveaxis(merge_idx, 1, 0))
  _, history = jax.lax.scan(step, (lo, m), xs)
  return tuple(jnp.moveaxis(x, 0, 1) for x in history)


def rank_matrix(lo_t, m_t, pos0=None):
  """Recency rank of the block holding s at time t: `#{live i at t : lo_t[i] > s}`.

  lo_t `[B, T, H, K]`, m_t `[B, T, H]` (from `replay_blocks`); pos0 `[B]` absolute position of
  token 0. Returns `[B, H, T, T]` int32 (t, s); entries with s > t are 0. Entries across a
  segment reset are meaningless and must be masked by the caller.
  """
  b, t, _, k = lo_t.shape
  pos0 = jnp.zeros((b,), jnp.int32) if pos0 is None else pos0
  s_abs = pos0[:, None] + jnp.arange(t, dtype=jnp.int32)                   # [B, S]
  live = jnp.arange(k) < m_t[..., None]                                     # [B, T, H, K]
  newer = lo_t[:, :, None] > s_abs[:, None, :, None, None]                  # [B, T, S, H, K]
  rank = jnp.sum(newer & live[:, :, None], axis=-1, dtype=jnp.int32)        # [B, T, S, H]
  rank = jnp.where(jnp.tril(jnp.ones((t, t), bool))[:, :, None], rank, 0)
  return jnp.transpose(rank, (0, 3, 1, 2))


def lam_matrix(lam, rank):
  """`Λ[b, h, t, s] = lam[b, t, h, min(rank[b, h, t, s], Kλ − 1)]`.

  lam `[B, T, H, Kλ]`, rank `[B, H, T, T]` int. Returns `[B, H, T, T]` in lam's dtype.
  """
  lam = jnp.moveaxis(lam, 2, 1)                                              # [B, H, T, Kλ]
  return jnp.take_along_axis(lam, jnp.clip(rank, 0, lam.shape[-1] - 1), axis=-1)

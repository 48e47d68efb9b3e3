"""Chunked DLA (spec dla.md §7): a `lax.scan` over chunks carrying the `DLACache`.

Per chunk of C tokens starting at absolute position c0, batched over (B, H):

  1. `chunk_math` (§7.1): A_in, A_kk, Q̃, K̃′, K̂ and the transport F.
  2. Bookkeeping scan over the C tokens, on scalars under `stop_gradient` (§6.3/§6.4): the score
     from the open slot's key response `u_i = S_openᵀ k_i` (or the base state's `r_i`), the
     boundary, the capacity merge, and the block layout (m_i, lo_i[K]) after every token.
  3. Rank maps `R_in[i,s] = #{j < m_i : lo_i[j] > c0+s}`, `R_pre[i,j] = #{j' < m_i : lo_i[j'] >
     lo⁰[j]}`, and `Λ = lam[i, min(R, Kλ−1)]`.
  4. `o_i = Σ_{j<m⁰} Λ_pre[i,j] (Q̃ S⁰_j)_i + Σ_{s≤i} Λ_in[i,s] A_in[i,s] v_s`.
  5. Slot states at the chunk end: `S_b = Σ_j Mpre[b,j] F S⁰_j + Σ_s Min[b,s] K̂[s] v_sᵀ`, with
     Mpre / Min the block membership of the pre-chunk slots / chunk tokens.

Chunks are grouped `remat_every` at a time and each group is a `jax.checkpoint`, so the backward
pass stores one cache per group and recomputes the chunks inside it (§7.3).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dlax.ops.common import accumulator_dtype, check_chunk_size, pad_time
from dlax.ops.dla.bookkeeping import (advance_blocks, legalize, merge_adjacent, merge_index,
                                      segment_resets, take_slot)
from dlax.ops.dla.chunk_math import ChunkMath, chunk_math, transport, weighted_read
from dlax.ops.dla.naive import cast_cache
from dlax.ops.dla.scores import open_slot_norms, open_slot_score, score_from_norms
from dlax.ops.dla.types import DLACache, DLADecisions


class _Config(NamedTuple):
  tau: float
  capacity: int
  scale: float
  score_ref: str
  eps: float
  eps_r: float
  size: int                   # Dk·Dv, for the RMS map of the score


class _Chunk(NamedTuple):
  """One chunk: `[B, H, C, ·]` tensors and gates, `[B, C]` resets, `[C]` valid (not padding)."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  g: jax.Array
  beta: jax.Array | None
  lam: jax.Array
  resets: jax.Array | None
  boundary: jax.Array | None       # injected decisions
  merge_idx: jax.Array | None
  valid: jax.Array                 # False on the padded tail


class _Book(NamedTuple):
  """Scalar carry of the bookkeeping scan: `[B, H, K]` slot metadata and `[B, H]` scalars."""
  m: jax.Array
  n: jax.Array
  info: jax.Array
  lo: jax.Array
  open_sq: jax.Array
  total_sq: jax.Array


class _Token(NamedTuple):
  """Per-token inputs of the bookkeeping scan (`[B, H, ·]`; `[B]` reset; scalar index/valid)."""
  index: jax.Array
  valid: jax.Array
  reset: jax.Array
  alpha: jax.Array
  beta: jax.Array | None
  k_sq: jax.Array
  v_sq: jax.Array
  v: jax.Array | None              # GDN open-slot score: v_i
  pre: jax.Array | None            # open: (K̃′ S⁰_open)_i (GDN) or its dot with v_i (Mamba-2)
  row: jax.Array | None            # open: A_kk[i, :] (GDN) or (A_kk ⊙ V Vᵀ)[i, :] (Mamba-2)
  r_dot_e: jax.Array | None        # total: r·e and ‖e‖² (§6.4)
  e_sq: jax.Array | None
  boundary: jax.Array | None
  merge_idx: jax.Array | None


def _token_inputs(cfg: _Config, cm: ChunkMath, x: _Chunk, cache: DLACache) -> _Token:
  """Time-major `[C, ...]` bookkeeping inputs. Nothing here carries a gradient."""
  alpha = jnp.exp(x.g)
  k_sq = jnp.sum(x.k * x.k, axis=-1)
  v_sq = jnp.sum(x.v * x.v, axis=-1)
  gdn = x.beta is not None
  v = pre = row = r_dot_e = e_sq = None
  if cfg.score_ref == "open":
    pre = jnp.einsum("bhck,bhkv->bhcv", cm.k_tilde, take_slot(cache.S, cache.m - 1))
    if gdn:
      v, row = x.v, cm.a_kk
    else:
      pre = jnp.sum(pre * x.v, axis=-1)                                  # γ′_i k_iᵀ S⁰_open v_i
      row = cm.a_kk * jnp.einsum("bhiv,bhsv->bhis", x.v, x.v)            # Gram
  else:
    r = (jnp.einsum("bhck,bhkv->bhcv", cm.k_tilde, jnp.sum(cache.S, axis=2))
         + jnp.einsum("bhis,bhsv->bhiv", cm.a_kk, x.v))                  # r_i = S_{i−1}ᵀ k_i
    e = x.v - alpha[..., None] * r if gdn else x.v
    r_dot_e, e_sq = jnp.sum(r * e, axis=-1), jnp.sum(e * e, axis=-1)
  per_token = dict(alpha=alpha, beta=x.beta, k_sq=k_sq, v_sq=v_sq, v=v, pre=pre, row=row,
                   r_dot_e=r_dot_e, e_sq=e_sq, boundary=x.boundary, merge_idx=x.merge_idx)
  token = _Token(index=jnp.arange(x.g.shape[-1]), valid=x.valid,
                 reset=None if x.resets is None else x.resets.T,
                 **{f: None if a is None else jnp.moveaxis(a, 2, 0)      # [B, H, C, ·] -> [C, ...]
                    for f, a in per_token.items()})
  return jax.lax.stop_gradient(token)


def _open_score(cfg: _Config, book: _Book, x: _Token, c0, values):
  """Open-slot score (§6.2–6.3) -> (I, ‖S_open‖² if absorbed, ‖c‖²). `values`: V_c for GDN."""
  c = x.row.shape[-1]
  open_lo = take_slot(book.lo, book.m - 1)
  pre = open_lo < c0[:, None]                                            # open block predates c0
  s = jnp.arange(c)
  in_open = (s >= (open_lo - c0[:, None])[..., None]) & (s < x.index)    # [B, H, C]
  row = jnp.where(in_open, x.row, 0.0)
  if x.beta is None:
    u_sq = None
    u_dot_v = jnp.where(pre, x.pre, 0.0) + jnp.sum(row, axis=-1)
  else:
    u = jnp.where(pre[..., None], x.pre, 0.0) + jnp.einsum("bhs,bhsv->bhv", row, values)
    u_sq, u_dot_v = jnp.sum(u * u, axis=-1), jnp.sum(u * x.v, axis=-1)
  r_sq, r_dot_c, c_sq = open_slot_norms(book.open_sq, u_sq, u_dot_v, x.k_sq, x.v_sq, x.alpha,
                                        x.beta)
  score = open_slot_score(r_sq, r_dot_c, c_sq, size=cfg.size, eps=cfg.eps, eps_r=cfg.eps_r)
  return score, r_sq + 2.0 * r_dot_c + c_sq, c_sq


def _total_score(cfg: _Config, book: _Book, x: _Token):
  """Base-state score (§6.4) -> (I, ‖S_t‖²)."""
  beta = 1.0 if x.beta is None else x.beta
  prev_sq = book.total_sq
  new_sq = (x.alpha ** 2 * prev_sq + 2.0 * x.alpha * beta * x.r_dot_e
            + beta ** 2 * x.k_sq * x.e_sq)
  cross = x.alpha * prev_sq + beta * x.r_dot_e
  score = score_from_norms(new_sq, prev_sq, cross, size=cfg.size, eps=cfg.eps, eps_r=cfg.eps_r)
  return score, new_sq


def _book_step(cfg: _Config, c0, values, book: _Book, x: _Token):
  """One token of the scalar bookkeeping (§6.3 "The scan"); mirrors `dla_step_reference`."""
  if x.reset is not None:
    book = jax.tree.map(
        lambda a: jnp.where(x.reset.reshape(-1, *(1,) * (a.ndim - 1)), jnp.zeros_like(a), a), book)
  if cfg.score_ref == "open":
    score, absorbed_sq, c_sq = _open_score(cfg, book, x, c0, values)
  else:
    score, total_sq = _total_score(cfg, book, x)
  score = jnp.where(book.m == 0, jnp.asarray(cfg.tau, score.dtype), score)
  if x.boundary is None:
    boundary, merge_idx = score >= cfg.tau, merge_index(book.n, book.info)
  else:
    boundary, merge_idx = x.boundary, x.merge_idx
  boundary, merge_idx = legalize(boundary, merge_idx, book.m, cfg.capacity)

  pos = (c0 + x.index)[:, None]
  lo, m, slot = advance_blocks(book.lo, book.m, pos, boundary, merge_idx)
  hit = jnp.arange(cfg.capacity) == slot[..., None]
  new = _Book(
      m=m, lo=lo,
      n=merge_adjacent(book.n, merge_idx) + hit.astype(book.n.dtype),
      info=merge_adjacent(book.info, merge_idx) + jnp.where(hit, score[..., None], 0.0),
      open_sq=(jnp.where(boundary, c_sq, absorbed_sq) if cfg.score_ref == "open"
               else book.open_sq),
      total_sq=total_sq if cfg.score_ref == "total" else book.total_sq)
  new = jax.tree.map(lambda a, b: jnp.where(x.valid, a, b), new, book)
  record = DLADecisions(boundary & x.valid, score, jnp.where(x.valid, merge_idx, -1), new.m)
  return new, (record, new.lo)


def _bookkeeping(cfg: _Config, cm: ChunkMath, x: _Chunk, cache: DLACache):
  """Runs the bookkeeping scan of one chunk.

  Returns:
    (final `_Book`, `DLADecisions` of `[B, H, C]`, lo history `[B, H, C, K]`).
  """
  c0 = cache.pos
  book = _Book(m=cache.m, n=cache.n, info=cache.info, lo=cache.lo, open_sq=cache.open_sq,
               total_sq=cache.total_sq)
  tokens = _token_inputs(cfg, cm, x, cache)
  values = jax.lax.stop_gradient(x.v) if tokens.v is not None else None
  step = functools.partial(_book_step, cfg, c0, values)
  book, (record, lo_hist) = jax.lax.scan(step, book, tokens)
  record, lo_hist = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 2), (record, lo_hist))
  return book, record, lo_hist


def _ranks(lo_hist, m_hist, positions):
  """`#{j < m_i : lo_i[j] > p}`: lo_hist `[B, H, C, K]`, m_hist `[B, H, C]`, positions
  `[B, H, P]` -> `[B, H, C, P]` int32."""
  live = jnp.arange(lo_hist.shape[-1]) < m_hist[..., None]
  newer = lo_hist[..., None, :] > positions[:, :, None, :, None]        # [B, H, C, P, K]
  return jnp.sum(newer & live[..., None, :], axis=-1, dtype=jnp.int32)


def _lam_weights(lam, ranks):
  """`lam[i, min(rank, Kλ−1)]`: lam `[B, H, C, Kλ]`, ranks `[B, H, C, P]` -> `[B, H, C, P]`.

  The clamped rank map is kept as int8/int16 (it is a residual of the backward pass).
  """
  klam = lam.shape[-1]
  index = jnp.minimum(ranks, klam - 1).astype(jnp.int8 if klam <= 128 else jnp.int16)
  return jnp.take_along_axis(lam, index, axis=-1)


def _block_membership(lo, m, positions, mask):
  """One-hot `[B, H, P, K]` of the live block holding each position (zero if none / masked).

  lo `[B, H, K]`, m `[B, H]`, positions `[B, H, P]`, mask broadcastable to `[B, H, P]`.
  """
  k = lo.shape[-1]
  live = jnp.arange(k) < m[..., None]
  started = (lo[..., None, :] <= positions[..., None]) & live[..., None, :]
  block = jnp.sum(started, axis=-1) - 1                                  # −1: before any block
  return jax.nn.one_hot(jnp.where(mask, block, -1), k, dtype=jnp.bool_)


def _chunk_step(cfg: _Config, cache: DLACache, x: _Chunk):
  """One chunk of §7.2. Returns (cache at the chunk end, (o `[B, H, C, Dv]`, decisions))."""
  b, h, c, _ = x.q.shape
  resets = None if x.resets is None else x.resets[:, None, :]
  cm = chunk_math(x.q, x.k, x.g, x.beta, resets, scale=cfg.scale)
  book, record, lo_hist = _bookkeeping(cfg, cm, x, cache)

  c0 = cache.pos
  s_abs = jnp.broadcast_to((c0[:, None] + jnp.arange(c))[:, None], (b, h, c))
  slots = jnp.arange(cfg.capacity)
  pre_live = slots < cache.m[..., None]                                  # [B, H, K]

  lam_in = _lam_weights(x.lam, _ranks(lo_hist, record.num_slots, s_abs))
  lam_pre = _lam_weights(x.lam, _ranks(lo_hist, record.num_slots, cache.lo))
  lam_pre = jnp.where(pre_live[:, :, None], lam_pre, 0.0)
  o = (weighted_read(cm.q_tilde, cache.S, lam_pre)
       + jnp.einsum("bhis,bhsv->bhiv", lam_in * cm.a_in, x.v))

  member_pre = _block_membership(book.lo, book.m, cache.lo, pre_live).astype(cache.S.dtype)
  member_in = _block_membership(book.lo, book.m, s_abs, x.valid).astype(cache.S.dtype)
  states = (jnp.einsum("bhjc,bhjkv->bhckv", member_pre, transport(cm, cache.S))
            + jnp.einsum("bhsc,bhsk,bhsv->bhckv", member_in, cm.k_hat, x.v))
  new_cache = DLACache(
      S=states, n=book.n, info=book.info, lo=book.lo, m=book.m,
      open_sq=jnp.sum(take_slot(states, book.m - 1) ** 2, axis=(-2, -1)),
      total_sq=jnp.sum(jnp.sum(states, axis=2) ** 2, axis=(-2, -1)),
      pos=cache.pos + jnp.sum(x.valid, dtype=cache.pos.dtype))
  return new_cache, (o, record)


def _to_groups(x, group: int, chunk: int, heads: bool):
  """`[B, T, (H), ...]` -> zero-padded `[G, R, B, (H), C, ...]` (R chunks of C tokens per group)."""
  if x is None:
    return None
  x = pad_time(x, group * chunk)
  x = x.reshape(x.shape[0], -1, group, chunk, *x.shape[2:])               # [B, G, R, C, ...]
  if heads:
    x = jnp.moveaxis(x, 4, 3)                                              # [B, G, R, H, C, ...]
  return jnp.moveaxis(x, 0, 2)


def _from_groups(x, t: int):
  """`[G, R, B, H, C, ...]` -> `[B, T, H, ...]` (drops the padded tail)."""
  x = jnp.moveaxis(x, 2, 0)                                                # [B, G, R, H, C, ...]
  x = jnp.moveaxis(x, 3, 4)                                                # [B, G, R, C, H, ...]
  return x.reshape(x.shape[0], -1, *x.shape[4:])[:, :t]


def dla_chunked(q, k, v, g, lam, beta=None, *, tau: float, capacity: int, chunk_size: int,
                scale: float, score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6,
                initial_cache: DLACache | None = None, segment_ids=None,
                decisions: DLADecisions | None = None, remat_every: int = 8):
  """Chunked DLA, equal to `dla_recurrent` (§4.6) for every chunk size.

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g: `[B, T, H]` log-decays. lam: `[B, T, H, Kλ]`.
    beta: `[B, T, H]` for Gated DeltaNet, or None for Mamba-2.
    tau, capacity, scale, score_ref, eps, eps_r: as in `dla_attention` (§5.1).
    chunk_size: C in 1..256; T is zero-padded to whole chunks (padded tokens are no-ops).
    initial_cache: optional `DLACache` continued by token 0.
    segment_ids: optional `[B, T]`; a token whose id differs from the previous one's empties the
      cache first.
    decisions: optional `DLADecisions` forcing boundaries and merges (scores are still computed).
    remat_every: at most this many chunks per `jax.checkpoint` group; the backward pass stores
      one cache per group and recomputes the chunks inside it.

  Returns:
    (o `[B, T, H, Dv]` in v's dtype, final `DLACache`, `DLADecisions` of `[B, T, H]` arrays).
  """
  check_chunk_size("dla_chunked", chunk_size)
  if score_ref not in ("open", "total"):
    raise ValueError(f"dla_chunked: score_ref must be 'open' or 'total', got {score_ref!r}")
  if remat_every < 1:
    raise ValueError(f"dla_chunked: remat_every must be >= 1, got {remat_every}")
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  acc = accumulator_dtype(q, k, v, g, lam, beta,
                          None if initial_cache is None else initial_cache.S)
  cache = (DLACache.empty(b, h, capacity, dk, dv, acc) if initial_cache is None
           else cast_cache(initial_cache, acc))
  cfg = _Config(tau=tau, capacity=capacity, scale=scale, score_ref=score_ref, eps=eps,
                eps_r=eps_r, size=dk * dv)

  n_chunks = -(-t // chunk_size)
  n_groups = -(-n_chunks // remat_every)
  group = -(-n_chunks // n_groups)                   # balanced: at most one padded chunk a group

  def per_head(x, dtype=acc):                        # [B, T, H, ...] -> [G, R, B, H, C, ...]
    return None if x is None else _to_groups(x.astype(dtype), group, chunk_size, heads=True)

  def per_token(x):                                  # [B, T] -> [G, R, B, C]
    return None if x is None else _to_groups(x, group, chunk_size, heads=False)

  forced = decisions or DLADecisions(None, None, None, None)
  xs = _Chunk(
      q=per_head(q), k=per_head(k), v=per_head(v), g=per_head(g), beta=per_head(beta),
      lam=per_head(lam),
      resets=per_token(None if segment_ids is None else segment_resets(segment_ids)),
      boundary=per_head(forced.boundary, bool), merge_idx=per_head(forced.merge_idx, jnp.int32),
      valid=per_token(jnp.ones((1, t), bool))[:, :, 0])

  chunk_step = functools.partial(_chunk_step, cfg)

  @jax.checkpoint
  def group_step(cache, xs_group):
    return jax.lax.scan(chunk_step, cache, xs_group)

  cache, (o, record) = jax.lax.scan(group_step, cache, xs)
  o = _from_groups(o, t).astype(v.dtype)
  return o, cache, jax.tree.map(lambda a: _from_groups(a, t), record)

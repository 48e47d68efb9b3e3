"""Reference implementations of DLA (spec dla.md §4.6): the step, its scan, and the masked form.

Per (batch, head), one token t of the recurrence on a chronological cache of m ≤ K block states
(slot m−1 = open), with `A_t(S) = α_t S` (Mamba-2) or `α_t (I − β_t k_t k_tᵀ) S` (GDN) and the
write `c = k_t v_tᵀ` (or `β_t k_t v_tᵀ`):

    S_i ← A_t(S_i) for every slot
    I = τ and b = 1 if m = 0, else I = score(…) and b = (I ≥ τ)
    b = 1: merge the least dense adjacent pair if m = K, then append (c, n=1, Ī=I, lo=t)
    b = 0: absorb (S_open += c, n_open += 1, Ī_open += I)
    o_t = Σ_{j<m} λ_{t, min(j, Kλ−1)} S_{m−1−j}ᵀ (scale · q_t)          (read after write)

Decisions are taken under `stop_gradient` (`decision_grad="none"`): gradients flow through the
states and λ only. All references run in the inputs' precision promoted to at least fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dlax.ops.common import accumulator_dtype
from dlax.ops.dla.bookkeeping import (advance_blocks, lam_matrix, legalize, merge_adjacent,
                                      merge_index, rank_matrix, replay_blocks, same_segment,
                                      segment_resets, take_slot)
from dlax.ops.dla.scores import score_from_states
from dlax.ops.dla.types import DLACache, DLADecisions
from dlax.ops.gated_delta.naive import gated_delta_attention_matrix
from dlax.ops.ssd.naive import ssd_attention_matrix


def _transition(states, k, g, beta):
  """`A_t` applied to every slot. states `[B, H, K, Dk, Dv]`, k `[B, H, Dk]`, g, beta `[B, H]`."""
  alpha = jnp.exp(g)[..., None, None, None]
  if beta is None:
    return alpha * states
  response = jnp.einsum("bhk,bhjkv->bhjv", k, states)                   # kᵀ S_j
  erase = beta[..., None, None, None] * k[:, :, None, :, None] * response[:, :, :, None, :]
  return alpha * (states - erase)


def _write(k, v, beta):
  """`w_t = k vᵀ` (or `β k vᵀ`): `[B, H, Dk, Dv]`."""
  c = k[..., :, None] * v[..., None, :]
  return c if beta is None else beta[..., None, None] * c


def _score(prev_states, states, c, m, *, score_ref, eps, eps_r, differentiable=False):
  """Information score `[B, H]`, under `stop_gradient` unless `differentiable` (the
  straight-through relaxation needs ∂I/∂inputs); meaningless where m = 0.

  "open": I(R + c, R) with R the transitioned open slot. "total": I(A_t(Y) + c, Y) with Y the
  base state before the step (the sum of all slots).
  """
  if not differentiable:
    prev_states, states, c = jax.lax.stop_gradient((prev_states, states, c))
  if score_ref == "open":
    ref = take_slot(states, m - 1)
    new = ref + c
  else:
    ref = jnp.sum(prev_states, axis=2)
    new = jnp.sum(states, axis=2) + c
  return score_from_states(new, ref, eps=eps, eps_r=eps_r)


def _read(states, m, lam, q, scale):
  """`Σ_{j<m} λ_{min(j, Kλ−1)} S_{m−1−j}ᵀ (scale q)`: `[B, H, Dv]`. lam `[B, H, Kλ]`."""
  slots = jnp.arange(states.shape[2])
  rank = m[..., None] - 1 - slots                                        # [B, H, K]
  weight = jnp.take_along_axis(lam, jnp.clip(rank, 0, lam.shape[-1] - 1), axis=-1)
  weight = jnp.where(rank >= 0, weight, 0)
  return jnp.einsum("bhj,bhk,bhjkv->bhv", weight, scale * q, states)


def reset_cache(cache: DLACache, reset) -> DLACache:
  """Empties the cache of batch rows where `reset [B]` is set (keeps `pos`)."""

  def clear(x):
    mask = reset.reshape(reset.shape + (1,) * (x.ndim - 1))
    return jnp.where(mask, jnp.zeros_like(x), x)

  return cache._replace(**{f: clear(getattr(cache, f)) for f in cache._fields if f != "pos"})


def cast_cache(cache: DLACache, dtype) -> DLACache:
  """Casts the floating fields of a cache to `dtype` (integer fields stay int32)."""
  return cache._replace(S=cache.S.astype(dtype), info=cache.info.astype(dtype),
                        open_sq=cache.open_sq.astype(dtype),
                        total_sq=cache.total_sq.astype(dtype))


def dla_step_reference(q, k, v, g, lam, cache: DLACache, beta=None, *, tau, scale: float,
                       score_ref: str, eps: float, eps_r: float, decision=None,
                       score_grad: bool = False):
  """One token of §4.6 for every (batch, head).

  Args:
    q, k: `[B, H, Dk]`. v: `[B, H, Dv]`. g, beta: `[B, H]`. lam: `[B, H, Kλ]`.
    cache: `DLACache` whose floating fields are in the accumulator dtype.
    decision: optional `DLADecisions` of `[B, H]` arrays forcing `boundary` and `merge_idx`
      (legalised: an empty cache always opens a state; a merge happens iff b = 1 and m = K, at
      the injected index clipped to 0..K−2). Its `score`/`num_slots` are ignored.

  Returns:
    (o `[B, H, Dv]` in the accumulator dtype, new cache, `DLADecisions` of `[B, H]` arrays).
  """
  acc = cache.S.dtype
  q, k, v, g, lam = (x.astype(acc) for x in (q, k, v, g, lam))
  beta = None if beta is None else beta.astype(acc)
  capacity = cache.capacity

  states = _transition(cache.S, k, g, beta)
  c = _write(k, v, beta)
  score = _score(cache.S, states, c, cache.m, score_ref=score_ref, eps=eps, eps_r=eps_r,
                 differentiable=score_grad)
  score = jnp.where(cache.m == 0, jnp.asarray(tau, acc), score)
  if decision is None:
    boundary = score >= tau
    merge_idx = merge_index(cache.n, cache.info)
  else:
    boundary, merge_idx = decision.boundary, decision.merge_idx
  boundary, merge_idx = legalize(boundary, merge_idx, cache.m, capacity)

  lo, m, slot = advance_blocks(cache.lo, cache.m, cache.pos[:, None], boundary, merge_idx)
  hit = jnp.arange(capacity) == slot[..., None]                          # [B, H, K]
  states = merge_adjacent(states, merge_idx, axis=2)
  states = states + jnp.where(hit[..., None, None], c[:, :, None], 0)
  n = merge_adjacent(cache.n, merge_idx) + hit.astype(cache.n.dtype)
  info = merge_adjacent(cache.info, merge_idx) + jnp.where(hit, score[..., None], 0)

  new_cache = DLACache(
      S=states, n=n, info=info, lo=lo, m=m,
      open_sq=jnp.sum(take_slot(states, m - 1) ** 2, axis=(-2, -1)),
      total_sq=jnp.sum(jnp.sum(states, axis=2) ** 2, axis=(-2, -1)),
      pos=cache.pos + 1)
  o = _read(states, m, lam, q, scale)
  return o, new_cache, DLADecisions(boundary, score, merge_idx, m)


def dla_recurrent(q, k, v, g, lam, beta=None, *, tau, capacity: int, scale: float,
                  score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6,
                  initial_cache: DLACache | None = None, segment_ids=None, decisions=None,
                  score_grad: bool = False):
  """Token-by-token `lax.scan` of `dla_step_reference` (the oracle).

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g, beta: `[B, T, H]`. lam: `[B, T, H, Kλ]`.
    initial_cache: optional `DLACache` continued by token 0.
    segment_ids: optional `[B, T]`; the cache is emptied before a token whose id differs from
      the previous token's.
    decisions: optional `DLADecisions` of `[B, T, H]` arrays forcing boundaries and merges.
    score_grad: let gradients flow into the recorded scores (decisions stay hard).

  Returns:
    (o `[B, T, H, Dv]` in v's dtype, final `DLACache`, `DLADecisions` of `[B, T, H]` arrays).
  """
  b, t, h, dk = q.shape
  acc = accumulator_dtype(q, k, v, g, lam, beta,
                          None if initial_cache is None else initial_cache.S)
  cache = (DLACache.empty(b, h, capacity, dk, v.shape[-1], acc) if initial_cache is None
           else cast_cache(initial_cache, acc))
  resets = jnp.zeros((b, t), bool) if segment_ids is None else segment_resets(segment_ids)

  def body(cache, xs):
    q, k, v, g, lam, beta, reset, decision = xs
    cache = reset_cache(cache, reset)
    o, cache, record = dla_step_reference(q, k, v, g, lam, cache, beta, tau=tau, scale=scale,
                                          score_ref=score_ref, eps=eps, eps_r=eps_r,
                                          decision=decision, score_grad=score_grad)
    return cache, (o, record)

  time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  xs = jax.tree.map(time_major, (q, k, v, g, lam, beta, resets, decisions))
  cache, (o, record) = jax.lax.scan(body, cache, xs)
  return (jnp.moveaxis(o, 0, 1).astype(v.dtype), cache,
          jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), record))


def base_attention_matrix(q, k, g, beta=None, *, scale: float):
  """Masked-form weights `A_base [B, H, T, T]` of the backbone (Mamba-2 or GDN, §2)."""
  if beta is None:
    return ssd_attention_matrix(q, k, g, scale=scale)
  return gated_delta_attention_matrix(q, k, g, beta, scale=scale)


def straight_through_lambda(lam, rank, lo_t, m_t, boundary, score, resets=None, *, tau,
                           temperature: float):
  """`Λ` plus a zero-valued term whose gradient is the straight-through relaxation of §4.3.

  Each boundary b_u is read as `p_u = σ((I_u − τ)/temperature)`, and every pair (t, s) with
  s < u ≤ t whose s lies in the open block at time u−1 (the block u joins when b_u = 0) gets the
  relaxed rank `r₀ + b_u`, r₀ = rank_t(s) − b_u. So `∂L/∂b_u = Σ_{t,s} ∂L/∂Λ[t,s] ·
  (λ_{t, r₀+1} − λ_{t, r₀})`, passed to I_u through p_u.

  Args:
    lam: `[B, T, H, Kλ]`. rank: `[B, H, T, T]` hard ranks. lo_t, m_t: `[B, T, H, K]`, `[B, T, H]`
      layouts after each step (`replay_blocks`). boundary: `[B, T, H]` hard decisions.
    score: `[B, T, H]` differentiable scores I_u. resets: optional `[B, T]` segment starts.

  Returns:
    `[B, H, T, T]`, equal in value to `lam_matrix(lam, rank)`.
  """
  t = rank.shape[-1]
  b_u = jnp.moveaxis(boundary, 1, 2).astype(lam.dtype)                      # [B, H, U]
  p_u = jax.nn.sigmoid((jnp.moveaxis(score, 1, 2) - tau) / temperature)
  delta = p_u - jax.lax.stop_gradient(p_u)                                   # 0 in value
  # Start of the open block at time u−1 (none for u = 0 or a segment start).
  open_lo = jnp.take_along_axis(lo_t, jnp.maximum(m_t - 1, 0)[..., None], axis=-1)[..., 0]
  open_lo = jnp.moveaxis(jnp.pad(open_lo[:, :-1], ((0, 0), (1, 0), (0, 0)),
                                 constant_values=t), 1, 2)                   # [B, H, U]
  if resets is not None:
    open_lo = jnp.where(resets[:, None], t, open_lo)
  u, tt, ss = (jnp.arange(t).reshape(shape) for shape in ((t, 1, 1), (1, t, 1), (1, 1, t)))
  pairs = ((ss < u) & (u <= tt))[None, None] & (open_lo[..., None, None] <= ss)  # [B,H,U,T,S]
  joined = jnp.einsum("bhu,bhuts->bhts", delta * (1 - b_u), pairs.astype(lam.dtype))
  opened = jnp.einsum("bhu,bhuts->bhts", delta * b_u, pairs.astype(lam.dtype))
  step_up = lambda r: lam_matrix(lam, r + 1) - lam_matrix(lam, r)            # λ_{r+1} − λ_r
  return (lam_matrix(lam, rank) + joined * step_up(rank)
          + opened * step_up(jnp.maximum(rank - 1, 0)))


def dla_masked(q, k, v, g, lam, beta=None, *, tau, capacity: int, scale: float,
               score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6,
               segment_ids=None, decisions=None, decision_grad: str = "none",
               temperature: float = 0.1):
  """O(T²) masked form `o = (A_base ⊙ Λ) V` with `Λ[t, s] = λ_{t, min(rank_t(s), Kλ−1)}` (§4.7).

  The rank maps are replayed from the decision history: the injected `decisions`, or those of
  `dla_recurrent` (run under `stop_gradient`). Entries across segments are zero. No initial
  cache. Shapes as in `dla_recurrent`. `decision_grad="straight_through"` keeps the forward hard
  and adds the relaxed-rank gradient of §4.3 (see `straight_through_lambda`), with
  `p_u = σ((I_u − τ)/temperature)`.

  Returns:
    (o `[B, T, H, Dv]` in v's dtype, `DLADecisions` of `[B, T, H]` arrays; with injected
    decisions and `decision_grad="none"` its `score` echoes theirs).
  """
  acc = accumulator_dtype(q, k, v, g, lam, beta)
  straight_through = decision_grad == "straight_through"
  options = dict(tau=tau, capacity=capacity, scale=scale, score_ref=score_ref, eps=eps,
                 eps_r=eps_r, segment_ids=segment_ids)
  if straight_through:
    _, _, decisions = dla_recurrent(q, k, v, g, lam, beta, decisions=decisions, score_grad=True,
                                    **options)
  elif decisions is None:
    _, _, decisions = dla_recurrent(*jax.lax.stop_gradient((q, k, v, g, lam, beta)), **options)
  resets = None if segment_ids is None else segment_resets(segment_ids)
  lo_t, m_t, boundary, merge_idx = replay_blocks(
      decisions.boundary, decisions.merge_idx, capacity=capacity, resets=resets)
  rank = rank_matrix(lo_t, m_t)
  if straight_through:
    lam_weights = straight_through_lambda(lam.astype(acc), rank, lo_t, m_t, boundary,
                                          decisions.score, resets, tau=tau,
                                          temperature=temperature)
  else:
    lam_weights = lam_matrix(lam.astype(acc), rank)
  weights = base_attention_matrix(q, k, g, beta, scale=scale) * lam_weights
  if segment_ids is not None:
    weights = jnp.where(same_segment(segment_ids)[:, None], weights, 0)
  o = jnp.einsum("bhts,bshv->bthv", weights, v.astype(acc))
  aux = DLADecisions(boundary, jax.lax.stop_gradient(decisions.score).astype(acc), merge_idx,
                     m_t)
  return o.astype(v.dtype), aux

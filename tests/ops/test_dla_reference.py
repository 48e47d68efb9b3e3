"""Tests of the DLA references (`impl="recurrent"`, `impl="masked"`, `dla_step`): spec dla.md §12.

Every property runs for both backbones (Mamba-2: beta None; GDN: L2-normalised keys, β given)
with random positive λ in float64. Properties of the chunked path (5, 12's prefill) live in the
chunked tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _helpers import Inputs, assert_close, seed_of
from dla_helpers import (BACKBONES, at, base_op, boundary_rate, make_inputs,
                         np_attention_matrix, np_base_states, np_transport, run, run_step,
                         step_loop, total_merges)
from dlax.ops import DLACache, DLADecisions, dla_attention, dla_step
from dlax.ops.dla.bookkeeping import merge_adjacent, merge_index, rank_matrix, replay_blocks
from dlax.ops.dla.scores import (open_slot_norms, open_slot_score, score_from_norms,
                                 score_from_states)

REFS = ("recurrent", "masked")
SHAPE = dict(b=2, t=32, h=2, dk=4, dv=3)                   # shared so that jit caches are reused
TOL = 1e-10


def inputs(rng, backbone, capacity=3, **shape):
  shape = {**SHAPE, **shape}
  return make_inputs(rng, shape["b"], shape["t"], shape["h"], shape["dk"], shape["dv"], capacity,
                     backbone=backbone)


def assert_decisions_equal(actual, expected, msg="", scores=True):
  for field in DLADecisions._fields:
    if field == "score" and not scores:
      continue
    a, e = np.asarray(getattr(actual, field)), np.asarray(getattr(expected, field))
    if field == "score":
      np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12, err_msg=f"{msg} {field}")
    else:
      np.testing.assert_array_equal(a, e, err_msg=f"{msg} {field}")


def assert_caches_close(actual: DLACache, expected: DLACache, msg=""):
  for field in DLACache._fields:
    a, e = np.asarray(getattr(actual, field)), np.asarray(getattr(expected, field))
    assert a.shape == e.shape, f"{msg} {field}"
    if np.issubdtype(a.dtype, np.integer):
      np.testing.assert_array_equal(a, e, err_msg=f"{msg} {field}")
    else:
      np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12, err_msg=f"{msg} {field}")


def assert_active(aux, msg=""):
  """The decisions exercise both outcomes and at least one capacity merge."""
  rate = boundary_rate(aux)
  assert 0.0 < rate < 1.0, f"{msg}: boundary rate {rate}"
  assert total_merges(aux) > 0, f"{msg}: no capacity merge occurred"


# ---------------------------------------------------------------------------------------------
# P1–P4: reductions and the masked view.


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("tau,capacity,score_ref", [(0.3, 2, "open"), (0.6, 3, "total"),
                                                    (0.5, 3, "open"), (0.8, 4, "total")])
def test_p1_lambda_one_equals_base(rng, backbone, tau, capacity, score_ref):
  x, lam = inputs(rng, backbone, capacity)
  lam = jnp.ones_like(lam)
  o_base, state_base = base_op(x)
  msg = f"seed={seed_of(rng)}"
  o, cache, aux = run(x, lam, tau=tau, capacity=capacity, score_ref=score_ref, impl="recurrent",
                      return_cache=True, return_aux=True)
  assert total_merges(aux) > 0, msg
  assert_close(o, o_base, TOL, msg)
  assert_close(jnp.sum(cache.S, axis=2), state_base, TOL, msg)
  assert_close(run(x, lam, tau=tau, capacity=capacity, score_ref=score_ref, impl="masked"), o_base,
               TOL, msg)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("impl", REFS)
def test_p2_infinite_tau_is_single_state(rng, backbone, impl):
  x, lam = inputs(rng, backbone)
  o, aux = run(x, lam, tau=jnp.inf, capacity=3, impl=impl, return_aux=True)
  np.testing.assert_array_equal(aux.num_slots, 1)
  np.testing.assert_array_equal(aux.boundary[:, 0], True)
  np.testing.assert_array_equal(aux.boundary[:, 1:], False)
  assert_close(o, lam[..., :1] * base_op(x)[0], TOL, f"seed={seed_of(rng)}")


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("impl", REFS)
@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_p3_every_token_a_boundary(rng, backbone, impl, tau):
  t = 12
  x, lam = inputs(rng, backbone, capacity=t, t=t)
  o, aux = run(x, lam, tau=tau, capacity=t, impl=impl, return_aux=True)
  np.testing.assert_array_equal(aux.boundary, True)
  np.testing.assert_array_equal(aux.num_slots,
                                np.broadcast_to(np.arange(1, t + 1)[:, None], aux.num_slots.shape))
  a_base = np_attention_matrix(x)                                       # [B, H, T, T]
  lam_np = np.asarray(lam)
  ti, si = np.tril_indices(t)
  weights = np.zeros_like(a_base)
  weights[:, :, ti, si] = (np.moveaxis(lam_np, 2, 1)[:, :, ti, ti - si] * a_base[:, :, ti, si])
  expected = np.einsum("bhts,bshv->bthv", weights, np.asarray(x.v))
  assert_close(o, expected, TOL, f"seed={seed_of(rng)}")


@pytest.mark.parametrize("impl", REFS)
def test_p3_unit_decay_unit_lambda_is_causal_linear_attention(rng, impl):
  t, scale = 12, 0.7
  x, lam = inputs(rng, "mamba2", capacity=t, t=t)
  x = x._replace(g=jnp.zeros_like(x.g))
  o = run(x, jnp.ones_like(lam), tau=0.0, capacity=t, scale=scale, impl=impl)
  q, k, v = (np.asarray(a) for a in (x.q, x.k, x.v))
  scores = np.einsum("bthk,bshk->bhts", q, k) * scale * np.tril(np.ones((t, t)))
  assert_close(o, np.einsum("bhts,bshv->bthv", scores, v), TOL, f"seed={seed_of(rng)}")


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("tau,capacity,score_ref", [(0.2, 2, "open"), (0.5, 3, "total"),
                                                    (0.8, 4, "open"), (0.3, 4, "total")])
def test_p4_recurrent_equals_masked(rng, backbone, tau, capacity, score_ref):
  x, lam = inputs(rng, backbone, capacity)
  kwargs = dict(tau=tau, capacity=capacity, score_ref=score_ref, return_aux=True)
  o, aux = run(x, lam, impl="recurrent", **kwargs)
  o_masked, aux_masked = run(x, lam, impl="masked", **kwargs)
  msg = f"seed={seed_of(rng)}"
  assert_active(aux, msg)
  assert_close(o_masked, o, TOL, msg)
  assert_decisions_equal(aux_masked, aux, msg)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p4_injected_decisions(rng, backbone):
  """Decisions recorded at one τ, injected into a run at another, drive both references."""
  x, lam = inputs(rng, backbone)
  _, forced = run(x, lam, tau=0.3, capacity=3, impl="recurrent", return_aux=True)
  o_free = run(x, lam, tau=0.8, capacity=3, impl="recurrent")
  outs = {}
  for impl in REFS:
    outs[impl], aux = run(x, lam, tau=0.8, capacity=3, decisions=forced, impl=impl,
                          return_aux=True)
    assert_decisions_equal(aux, forced, impl, scores=False)
  msg = f"seed={seed_of(rng)}"
  assert_close(outs["masked"], outs["recurrent"], TOL, msg)
  assert_close(outs["recurrent"], run(x, lam, tau=0.3, capacity=3, impl="recurrent"), TOL, msg)
  assert not np.allclose(o_free, outs["recurrent"]), msg


# ---------------------------------------------------------------------------------------------
# P6–P8: slot states, cache invariants and the merge rule, step by step.


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p6_snapshot_form(rng, backbone):
  """Slot [lo, hi] at time t equals Φ_{hi→t}(G_hi − Φ_{lo−1→hi} G_{lo−1}) (G_{−1} = 0)."""
  t = 16
  x, lam = inputs(rng, backbone, t=t)
  _, caches, records = step_loop(x, lam, capacity=3, tau=0.5)
  assert sum(int(np.sum(r.merge_idx >= 0)) for r in records) > 0
  snapshots = np_base_states(x)
  zero = np.zeros_like(snapshots[0])
  b, h = x.g.shape[0], x.g.shape[2]
  for now, cache in enumerate(caches):
    m, lo, states = np.asarray(cache.m), np.asarray(cache.lo), np.asarray(cache.S)
    for bi in range(b):
      for hi_ in range(h):
        for i in range(m[bi, hi_]):
          start = lo[bi, hi_, i]
          end = lo[bi, hi_, i + 1] - 1 if i + 1 < m[bi, hi_] else now
          before = zero if start == 0 else np_transport(snapshots[start - 1], x, start - 1, end)
          expected = np_transport(snapshots[end] - before, x, end, now)[bi, hi_]
          np.testing.assert_allclose(states[bi, hi_, i], expected, rtol=1e-9, atol=1e-12,
                                     err_msg=f"t={now} slot={i} seed={seed_of(rng)}")


def _live(cache, bi, hi):
  m = int(cache.m[bi, hi])
  return m, [np.asarray(getattr(cache, f))[bi, hi, :m] for f in ("lo", "n", "info")]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("score_ref", ["open", "total"])
def test_p7_cache_invariants(rng, backbone, score_ref):
  t, capacity = 24, 3
  x, lam = inputs(rng, backbone, capacity, t=t)
  _, caches, records = step_loop(x, lam, capacity=capacity, tau=0.5, score_ref=score_ref)
  merges = 0
  for now, (cache, record) in enumerate(zip(caches, records)):
    prev = caches[now - 1] if now else None
    np.testing.assert_array_equal(cache.pos, now + 1)
    states = np.asarray(cache.S)
    for bi in range(x.q.shape[0]):
      for hi in range(x.q.shape[2]):
        msg = f"t={now} b={bi} h={hi} seed={seed_of(rng)}"
        m, (lo, n, info) = _live(cache, bi, hi)
        boundary, merge = bool(record.boundary[bi, hi]), int(record.merge_idx[bi, hi])
        assert 1 <= m <= capacity and m == int(record.num_slots[bi, hi]), msg
        # Contiguous chronological blocks covering 0..now; the newest ends at now.
        ends = np.append(lo[1:] - 1, now)
        assert lo[0] == 0 and np.all(np.diff(lo) > 0), msg
        np.testing.assert_array_equal(n, ends - lo + 1, err_msg=msg)
        assert n.sum() == now + 1, msg
        scores = [float(r.score[bi, hi]) for r in records[:now + 1]]
        np.testing.assert_allclose(info.sum(), sum(scores), rtol=1e-12, err_msg=msg)
        if boundary:
          assert lo[-1] == now and n[-1] == 1, msg
        # Slots >= m are exactly zero.
        for field in ("S", "n", "info", "lo"):
          assert not np.any(np.asarray(getattr(cache, field))[bi, hi, m:]), (msg, field)
        # Exactly one merge iff b = 1 and the cache was full; the merged pair is adjacent.
        if prev is None:
          assert boundary and merge == -1 and m == 1, msg
          continue
        m_prev, (lo_prev, n_prev, _) = _live(prev, bi, hi)
        assert (merge >= 0) == (boundary and m_prev == capacity), msg
        expected_lo, expected_n = list(lo_prev), list(n_prev)
        if merge >= 0:
          merges += 1
          assert 0 <= merge <= capacity - 2, msg
          expected_n[merge] += expected_n.pop(merge + 1)
          expected_lo.pop(merge + 1)
        if boundary:
          expected_lo.append(now)
          expected_n.append(1)
        else:
          expected_n[-1] += 1
        assert m == m_prev + boundary - (merge >= 0), msg
        np.testing.assert_array_equal(lo, expected_lo, err_msg=msg)
        np.testing.assert_array_equal(n, expected_n, err_msg=msg)
        # Norm caches.
        np.testing.assert_allclose(cache.open_sq[bi, hi], np.sum(states[bi, hi, m - 1] ** 2),
                                   rtol=1e-12, err_msg=msg)
        np.testing.assert_allclose(cache.total_sq[bi, hi],
                                   np.sum(states[bi, hi].sum(axis=0) ** 2), rtol=1e-12,
                                   err_msg=msg)
  rate = np.mean([np.asarray(r.boundary) for r in records])
  assert merges > 0 and 0 < rate < 1, (merges, rate)


MERGE_CASES = {  # name -> (n, Ī, expected i*)
    "least_dense_middle": ([1, 1, 1, 1], [0.9, 0.1, 0.1, 0.9], 1),
    "ties_go_to_oldest": ([1, 1, 1, 1], [0.5, 0.5, 0.5, 0.5], 0),
    "open_state_merged": ([1, 1, 1, 1], [0.9, 0.9, 0.1, 0.1], 2),
    "density_not_sum": ([3, 1, 1, 1], [0.6, 0.5, 0.5, 0.5], 0),
    "later_tie_goes_to_older_pair": ([1, 1, 1, 1], [0.9, 0.1, 0.1, 0.1], 1),
    "weighted_by_counts": ([2, 2, 1, 3], [1.0, 1.0, 0.2, 1.5], 1),
}


@pytest.mark.parametrize("case", MERGE_CASES.values(), ids=MERGE_CASES.keys())
def test_p8_merge_rule(rng, case):
  n, info, expected = case
  n, info = jnp.asarray(n, jnp.int32), jnp.asarray(info, jnp.float64)
  assert int(merge_index(n, info)) == expected
  # The same rule inside a step: a full cache, a forced boundary (τ = −1), α = 1.
  capacity, dk, dv = 4, 2, 3
  states = jnp.asarray(rng.standard_normal((1, 1, capacity, dk, dv)), jnp.float64)
  lo = jnp.cumsum(jnp.concatenate([jnp.zeros(1, jnp.int32), n[:-1]]))
  cache = DLACache(S=states, n=n[None, None], info=info[None, None], lo=lo[None, None],
                   m=jnp.full((1, 1), capacity, jnp.int32), open_sq=jnp.zeros((1, 1)),
                   total_sq=jnp.zeros((1, 1)), pos=jnp.asarray([int(n.sum())], jnp.int32))
  x_t = Inputs(*(jnp.asarray(rng.standard_normal(s), jnp.float64)
                 for s in ((1, 1, dk), (1, 1, dk), (1, 1, dv))), jnp.zeros((1, 1), jnp.float64))
  lam = jnp.ones((1, 1, capacity), jnp.float64)
  _, new, record = run_step(x_t, lam, cache, capacity=capacity, tau=-1.0, return_aux=True)
  assert bool(record.boundary[0, 0]) and int(record.merge_idx[0, 0]) == expected
  old = np.asarray(states[0, 0])
  merged = [old[i] for i in range(capacity)]
  merged[expected] = merged[expected] + merged.pop(expected + 1)
  merged.append(np.asarray(x_t.k[0, 0])[:, None] * np.asarray(x_t.v[0, 0])[None, :])
  np.testing.assert_allclose(new.S[0, 0], np.stack(merged), rtol=1e-14)
  expected_n = list(np.asarray(n))
  expected_n[expected] += expected_n.pop(expected + 1)
  np.testing.assert_array_equal(new.n[0, 0], expected_n + [1])
  np.testing.assert_array_equal(new.lo[0, 0], list(np.delete(np.asarray(lo), expected + 1))
                                + [int(n.sum())])
  assert int(new.m[0, 0]) == capacity


def test_p8_merge_adjacent_shifts_and_identity():
  x = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
  out = merge_adjacent(x, jnp.asarray([0, 2, -1]))
  np.testing.assert_array_equal(out, [[3, 3, 4, 0], [1, 2, 7, 0], [1, 2, 3, 4]])
  out = merge_adjacent(x.astype(jnp.int32), jnp.asarray([1, 3, 0]), combine=False)
  np.testing.assert_array_equal(out, [[1, 2, 4, 0], [1, 2, 3, 4], [1, 3, 4, 0]])


def test_p8_bookkeeping_replay_and_ranks():
  """Hand-traced replay (K = 2) and its rank matrix."""
  boundary = jnp.asarray([1, 0, 1, 1, 0], bool)[None, :, None]
  merge_idx = jnp.asarray([-1, -1, -1, 0, -1], jnp.int32)[None, :, None]
  lo_t, m_t, b_legal, merge_legal = replay_blocks(boundary, merge_idx, capacity=2)
  np.testing.assert_array_equal(m_t[0, :, 0], [1, 1, 2, 2, 2])
  np.testing.assert_array_equal(lo_t[0, :, 0], [[0, 0], [0, 0], [0, 2], [0, 3], [0, 3]])
  np.testing.assert_array_equal(b_legal, boundary)
  np.testing.assert_array_equal(merge_legal, merge_idx)
  rank = np.asarray(rank_matrix(lo_t, m_t))[0, 0]
  np.testing.assert_array_equal(rank, [[0, 0, 0, 0, 0],
                                       [0, 0, 0, 0, 0],
                                       [1, 1, 0, 0, 0],
                                       [1, 1, 1, 0, 0],
                                       [1, 1, 1, 0, 0]])


# ---------------------------------------------------------------------------------------------
# P9: scores.


def _random_state(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float64)


def test_p9_score_properties(rng):
  ref, c = _random_state(rng, 64, 4, 5), _random_state(rng, 64, 4, 5)
  score = functools.partial(score_from_states, eps=1e-6, eps_r=1e-6)
  exact = functools.partial(score_from_states, eps=0.0, eps_r=0.0)
  base = score(ref + c, ref)
  for a in (1e-3, 0.5, 7.0):                     # exact without the ε's, ≈ while mean(X²) ≫ ε_r
    np.testing.assert_allclose(exact(a * (ref + c), a * ref), exact(ref + c, ref), rtol=1e-12)
  for a in (0.5, 7.0):
    np.testing.assert_allclose(score(a * (ref + c), a * ref), base, rtol=1e-4)
  assert np.all(base >= 0) and np.all(base <= 2 + 1e-9)
  np.testing.assert_allclose(score(ref - 2 * ref, ref), 2.0, rtol=1e-5)          # R + c = −R
  np.testing.assert_allclose(score(ref + 0.3 * ref, ref), 0.0, atol=1e-6)       # same direction


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p9_orthogonal_token_scores_0765(backbone):
  """An orthogonal equal-norm rank-1 token entering a one-token state (α = 1): I = √(2 − √2)."""
  e1, e2 = jnp.eye(2, dtype=jnp.float64)
  beta = None if backbone == "mamba2" else jnp.full((1, 2, 1), 0.5, jnp.float64)
  x = Inputs(q=jnp.ones((1, 2, 1, 2), jnp.float64), k=jnp.stack([e1, e2])[None, :, None],
             v=jnp.stack([e1, e1])[None, :, None], g=jnp.zeros((1, 2, 1), jnp.float64), beta=beta)
  lam = jnp.ones((1, 2, 1, 2), jnp.float64)
  for tau, boundary in ((0.6, True), (0.8, False)):
    _, _, records = step_loop(x, lam, capacity=2, tau=tau)
    score = float(records[1].score[0, 0])
    assert abs(score - 0.765) < 1e-3 and abs(score - np.sqrt(2 - np.sqrt(2))) < 1e-5, score
    assert bool(records[1].boundary[0, 0]) == boundary
  # A token in the same direction as the open state scores ≈ 0 and is absorbed.
  x = x._replace(k=jnp.stack([e1, e1])[None, :, None])
  _, _, records = step_loop(x, lam, capacity=2, tau=0.6)
  assert float(records[1].score[0, 0]) < 1e-4 and not bool(records[1].boundary[0, 0])
  np.testing.assert_allclose(records[0].score, 0.6)                    # empty cache: I := τ


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p9_scalar_formulas_equal_matrix_formula(rng, backbone):
  """§6.1 score from norms, §6.2 open-slot quantities and §6.4 total-state recurrences."""
  batch, dk, dv = 32, 4, 5
  kw = dict(eps=1e-6, eps_r=1e-6)
  state, k, v = (_random_state(rng, batch, *s) for s in ((dk, dv), (dk,), (dv,)))
  alpha = jnp.asarray(rng.uniform(0.3, 1.0, batch), jnp.float64)
  if backbone == "gdn":
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(0.05, 0.95, batch), jnp.float64)
    new_ref = alpha[:, None, None] * (state - beta[:, None, None] * k[:, :, None]
                                      * jnp.einsum("bk,bkv->bv", k, state)[:, None, :])
    write = beta[:, None, None] * k[:, :, None] * v[:, None, :]
  else:
    beta = None
    new_ref = alpha[:, None, None] * state
    write = k[:, :, None] * v[:, None, :]
  sq = lambda a: jnp.sum(a * a, axis=(-2, -1))
  dot = lambda a, b: jnp.sum(a * b, axis=(-2, -1))
  # §6.1
  size = dk * dv
  np.testing.assert_allclose(score_from_norms(sq(state + write), sq(state),
                                              dot(state + write, state), size=size, **kw),
                             score_from_states(state + write, state, **kw), rtol=1e-9)
  # §6.2
  u = jnp.einsum("bkv,bk->bv", state, k)
  r_sq, r_dot_c, c_sq = open_slot_norms(sq(state), jnp.sum(u * u, -1), jnp.sum(u * v, -1),
                                        jnp.sum(k * k, -1), jnp.sum(v * v, -1), alpha, beta)
  np.testing.assert_allclose(r_sq, sq(new_ref), rtol=1e-9)
  np.testing.assert_allclose(r_dot_c, dot(new_ref, write), rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(c_sq, sq(write), rtol=1e-9)
  np.testing.assert_allclose(open_slot_score(r_sq, r_dot_c, c_sq, size=size, **kw),
                             score_from_states(new_ref + write, new_ref, **kw), rtol=1e-9)
  # §6.4: r = Sᵀk, e = v − α r (Mamba-2: β = 1, e = v).
  new_total = new_ref + write
  r = u
  b_ = jnp.ones(batch, jnp.float64) if beta is None else beta
  e = v if beta is None else v - alpha[:, None] * r
  r_e = jnp.sum(r * e, -1)
  total_sq = (alpha**2 * sq(state) + 2 * alpha * b_ * r_e
              + b_**2 * jnp.sum(k * k, -1) * jnp.sum(e * e, -1))
  cross = alpha * sq(state) + b_ * r_e
  np.testing.assert_allclose(total_sq, sq(new_total), rtol=1e-9)
  np.testing.assert_allclose(cross, dot(new_total, state), rtol=1e-9)
  np.testing.assert_allclose(score_from_norms(total_sq, sq(state), cross, size=size, **kw),
                             score_from_states(new_total, state, **kw), rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# P11–P13: causality, streaming, segments.


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("impl", REFS)
def test_p11_causality(rng, backbone, impl):
  x, lam = inputs(rng, backbone)
  cut = 13
  o, aux = run(x, lam, tau=0.5, capacity=3, impl=impl, return_aux=True)
  noise = lambda a: a.at[:, cut + 1:].add(jnp.asarray(rng.standard_normal(a[:, cut + 1:].shape),
                                                      a.dtype))
  x2 = x.map(noise)._replace(g=x.g.at[:, cut + 1:].add(-1.0))
  o2, aux2 = run(x2, noise(lam), tau=0.5, capacity=3, impl=impl, return_aux=True)
  np.testing.assert_array_equal(o2[:, :cut + 1], o[:, :cut + 1])
  assert not np.allclose(o2[:, cut + 1:], o[:, cut + 1:])
  assert_decisions_equal(jax.tree.map(lambda a: a[:, :cut + 1], aux2),
                         jax.tree.map(lambda a: a[:, :cut + 1], aux))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p12_step_loop_equals_recurrent(rng, backbone):
  x, lam = inputs(rng, backbone)
  o_steps, caches, records = step_loop(x, lam, capacity=3, tau=0.5)
  o, cache, aux = run(x, lam, tau=0.5, capacity=3, impl="recurrent", return_cache=True,
                      return_aux=True)
  msg = f"seed={seed_of(rng)}"
  assert_active(aux, msg)
  assert_close(o_steps, o, 1e-12, msg)
  assert_caches_close(caches[-1], cache, msg)
  stacked = jax.tree.map(lambda *a: jnp.stack(a, axis=1), *records)
  assert_decisions_equal(stacked, aux, msg)


def _split_points(aux):
  """Split points such that, for some (b, h), the first token after the split continues the
  open block, and for some (b, h) it triggers a capacity merge (one point if possible)."""
  boundary, merge = np.asarray(aux.boundary), np.asarray(aux.merge_idx)
  times = range(2, boundary.shape[1] - 2)
  mid_block = [t for t in times if not boundary[:, t].all()]
  merging = [t for t in times if (merge[:, t] >= 0).any()]
  assert mid_block and merging, "no split mid-block / before a merge in this draw"
  both = sorted(set(mid_block) & set(merging))
  return both[:1] or [mid_block[0], merging[0]]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("score_ref", ["open", "total"])
def test_p12_streaming_equals_one_call(rng, backbone, score_ref):
  x, lam = inputs(rng, backbone)
  kwargs = dict(tau=0.5, capacity=3, score_ref=score_ref, impl="recurrent", return_cache=True,
                return_aux=True)
  o, cache, aux = run(x, lam, **kwargs)
  for split in _split_points(aux):
    msg = f"split={split} seed={seed_of(rng)}"
    o1, c1, aux1 = run(at(x, slice(None, split)), lam[:, :split], **kwargs)
    o2, c2, aux2 = run(at(x, slice(split, None)), lam[:, split:], initial_cache=c1, **kwargs)
    assert_close(jnp.concatenate([o1, o2], axis=1), o, 1e-12, msg)
    assert_caches_close(c2, cache, msg)
    assert_decisions_equal(jax.tree.map(lambda a, b: jnp.concatenate([a, b], 1), aux1, aux2),
                           aux, msg)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("impl", REFS)
def test_p13_packed_segments_equal_separate_runs(rng, backbone, impl):
  lengths = [(12, 8, 12), (8, 12, 12)]                              # per batch row, T = 32
  x, lam = inputs(rng, backbone)
  ids = np.concatenate([np.concatenate([np.full(n, i % 2) for i, n in enumerate(row)])[None]
                        for row in lengths])                         # ids reused: 0, 1, 0
  kwargs = dict(tau=0.5, capacity=3, impl=impl, return_aux=True)
  o, aux = run(x, lam, segment_ids=jnp.asarray(ids, jnp.int32), **kwargs)
  for row, row_lengths in enumerate(lengths):
    start = 0
    for n in row_lengths:
      part = slice(start, start + n)
      sub = x.map(lambda a: a[row:row + 1, part])
      o_sub, aux_sub = run(sub, lam[row:row + 1, part], **kwargs)
      msg = f"row={row} start={start} seed={seed_of(rng)}"
      assert_close(o[row:row + 1, part], o_sub, 1e-12, msg)
      assert_decisions_equal(jax.tree.map(lambda a: a[row:row + 1, part], aux), aux_sub, msg)
      np.testing.assert_array_equal(aux.num_slots[row, start], 1)
      np.testing.assert_allclose(aux.score[row, start], 0.5)
      start += n


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p13_cache_resets_at_segment_start(rng, backbone):
  x, lam = inputs(rng, backbone)
  split = 19
  ids = jnp.asarray(np.repeat([[3, 5]], [split, 32 - split], axis=1).repeat(2, 0), jnp.int32)
  kwargs = dict(tau=0.5, capacity=3, impl="recurrent", return_cache=True)
  _, cache = run(x, lam, segment_ids=ids, **kwargs)
  _, tail = run(at(x, slice(split, None)), lam[:, split:], **kwargs)
  msg = f"seed={seed_of(rng)}"
  assert_caches_close(cache._replace(lo=cache.lo - split * (cache.n > 0), pos=cache.pos - split),
                      tail, msg)


# ---------------------------------------------------------------------------------------------
# P14: gradients.


def _grad_inputs(x: Inputs, lam):
  return (x.q, x.k, x.v, x.g, lam, x.beta)


GRAD_NAMES = ("q", "k", "v", "g", "lam", "beta")


@functools.partial(jax.jit, static_argnames=("impl",))
def _grads(args, cotangent, decisions, impl):
  """Gradients of ⟨o, cotangent⟩ and of Σ aux.score wrt (q, k, v, g, lam, beta)."""

  def outputs(args):
    o, aux = dla_attention(*args, tau=0.5, capacity=3, impl=impl, decisions=decisions,
                           return_aux=True)
    return jnp.sum(o * cotangent), jnp.sum(aux.score)

  _, vjp = jax.vjp(outputs, args)
  one, zero = jnp.ones((), cotangent.dtype), jnp.zeros((), cotangent.dtype)
  return vjp((one, zero))[0], vjp((zero, one))[0]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p14_decisions_receive_no_gradient(rng, backbone):
  x, lam = inputs(rng, backbone)
  args = _grad_inputs(x, lam)
  _, aux = run(x, lam, tau=0.5, capacity=3, impl="recurrent", return_aux=True)
  cotangent = jnp.asarray(rng.standard_normal(x.v.shape), jnp.float64)
  free, score_grads = _grads(args, cotangent, None, "recurrent")
  frozen, _ = _grads(args, cotangent, aux, "recurrent")
  for name, grad, score_grad, grad_frozen in zip(GRAD_NAMES, free, score_grads, frozen):
    if grad is None:
      continue
    np.testing.assert_array_equal(score_grad, 0.0, err_msg=name)
    np.testing.assert_allclose(grad, grad_frozen, rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p14_recurrent_and_masked_gradients_agree(rng, backbone):
  x, lam = inputs(rng, backbone)
  args = _grad_inputs(x, lam)
  _, aux = run(x, lam, tau=0.5, capacity=3, impl="recurrent", return_aux=True)
  assert total_merges(aux) > 0
  cotangent = jnp.asarray(rng.standard_normal(x.v.shape), jnp.float64)
  grads = {impl: _grads(args, cotangent, aux, impl)[0] for impl in REFS}
  for name, g_rec, g_mask in zip(GRAD_NAMES, grads["recurrent"], grads["masked"]):
    if g_rec is None:
      continue
    assert np.all(np.isfinite(g_rec)) and np.any(g_rec != 0), name
    assert_close(g_mask, g_rec, 1e-9, f"d/d{name} seed={seed_of(rng)}")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p14_check_grads_with_frozen_decisions(rng, backbone):
  x, lam = inputs(rng, backbone, capacity=2, b=1, t=7, h=1, dk=3, dv=2)
  _, aux = run(x, lam, tau=0.4, capacity=2, impl="recurrent", return_aux=True)
  args = tuple(a for a in _grad_inputs(x, lam) if a is not None)

  def fn(*args):
    q, k, v, g, lam, *beta = args
    return dla_attention(q, k, v, g, lam, *beta, tau=0.4, capacity=2, impl="recurrent",
                         decisions=aux)

  check_grads(jax.jit(fn), args, order=1, modes=("rev",))


# ---------------------------------------------------------------------------------------------
# P15, P17: cache shapes and the API contract.


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p15_cache_shapes_independent_of_length(rng, backbone):
  shapes = set()
  for t in (SHAPE["t"], 13):
    x, lam = inputs(rng, backbone, capacity=4, t=t)
    _, cache = run(x, lam, capacity=4, impl="recurrent", return_cache=True)
    shapes.add(tuple((f, getattr(cache, f).shape, getattr(cache, f).dtype) for f in cache._fields))
  assert len(shapes) == 1
  b, h, dk, dv = SHAPE["b"], SHAPE["h"], SHAPE["dk"], SHAPE["dv"]
  assert dict((f, s) for f, s, _ in shapes.pop()) == {
      "S": (b, h, 4, dk, dv), "n": (b, h, 4), "info": (b, h, 4), "lo": (b, h, 4), "m": (b, h),
      "open_sq": (b, h), "total_sq": (b, h), "pos": (b,)}


@pytest.mark.parametrize("impl", REFS)
def test_p17_dtypes(rng, impl):
  """bf16 q, k, v, β with fp32 g, λ: o in bf16; cache and scores in fp32."""
  x64, lam = inputs(rng, "gdn", t=9)
  x = Inputs(*(a.astype(jnp.bfloat16) for a in (x64.q, x64.k, x64.v)), x64.g.astype(jnp.float32),
             x64.beta.astype(jnp.bfloat16))
  lam = lam.astype(jnp.float32)
  with_cache = impl == "recurrent"
  outs = jax.eval_shape(functools.partial(dla_attention, capacity=3, impl=impl, return_aux=True,
                                          return_cache=with_cache), *_grad_inputs(x, lam))
  o, aux = outs[0], outs[-1]
  assert o.dtype == jnp.bfloat16 and o.shape == x.v.shape
  assert aux.boundary.dtype == jnp.bool_ and aux.score.dtype == jnp.float32
  assert aux.merge_idx.dtype == jnp.int32 and aux.num_slots.dtype == jnp.int32
  x_0 = at(x, 0)
  o_step, step_cache = jax.eval_shape(dla_step, x_0.q, x_0.k, x_0.v, x_0.g, lam[:, 0],
                                      DLACache.empty(2, 2, 3, 4, 3), x_0.beta)
  assert o_step.dtype == jnp.bfloat16 and o_step.shape == x_0.v.shape
  for cache in (step_cache, outs[1]) if with_cache else (step_cache,):
    assert cache.S.dtype == cache.info.dtype == jnp.float32
    assert cache.open_sq.dtype == cache.total_sq.dtype == jnp.float32
    assert cache.n.dtype == cache.lo.dtype == cache.m.dtype == cache.pos.dtype == jnp.int32
  # With the float64 decisions injected, the bf16 run agrees to low precision.
  o64, aux64 = run(x64, lam.astype(jnp.float64), capacity=3, impl=impl, return_aux=True)
  o = run(x, lam, capacity=3, impl=impl, decisions=aux64)
  assert o.dtype == jnp.bfloat16
  assert_close(o, o64, 2e-2)


@pytest.mark.parametrize("impl", REFS)
def test_p17_jit_and_vmap(rng, impl):
  """Under jit (capacity static) and vmap over an extra leading axis."""
  x, lam = inputs(rng, "gdn")
  kwargs = dict(tau=0.5, capacity=3, impl=impl)
  stacked = tuple(jnp.stack([a, a[::-1]]) for a in _grad_inputs(x, lam))
  vmapped = jax.jit(jax.vmap(functools.partial(dla_attention, **kwargs)))(*stacked)
  assert_close(vmapped[0], run(x, lam, **kwargs), 1e-12)
  assert_close(vmapped[1], run(x.map(lambda a: a[::-1]), lam[::-1], **kwargs), 1e-12)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("impl", REFS)
def test_p17_short_lambda_reuses_last_weight(rng, backbone, impl):
  capacity, klam = 4, 2
  x, lam = inputs(rng, backbone, capacity=klam)
  padded = jnp.concatenate([lam, jnp.repeat(lam[..., -1:], capacity - klam, axis=-1)], axis=-1)
  o, aux = run(x, lam, tau=0.5, capacity=capacity, impl=impl, return_aux=True)
  assert int(aux.num_slots.max()) > klam
  assert_close(o, run(x, padded, tau=0.5, capacity=capacity, impl=impl), 1e-12,
               f"seed={seed_of(rng)}")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p17_aux_consistent_with_final_cache(rng, backbone):
  x, lam = inputs(rng, backbone)
  _, cache, aux = run(x, lam, tau=0.5, capacity=3, impl="recurrent", return_cache=True,
                      return_aux=True)
  np.testing.assert_array_equal(aux.num_slots[:, -1], cache.m)
  np.testing.assert_array_equal(cache.pos, SHAPE["t"])
  np.testing.assert_array_equal(jnp.sum(cache.n, -1), SHAPE["t"])
  np.testing.assert_allclose(jnp.sum(cache.info, -1), jnp.sum(aux.score, 1), rtol=1e-12)
  m_prev = jnp.concatenate([jnp.zeros_like(aux.num_slots[:, :1]), aux.num_slots[:, :-1]], 1)
  np.testing.assert_array_equal(aux.num_slots, m_prev + aux.boundary - (aux.merge_idx >= 0))
  np.testing.assert_array_equal(aux.merge_idx >= 0, aux.boundary & (m_prev == 3))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p17_single_token_call_equals_step(rng, backbone):
  t = SHAPE["t"]
  x, lam = inputs(rng, backbone, t=t + 1)
  kwargs = dict(tau=0.5, capacity=3)
  _, prefix = run(at(x, slice(None, t)), lam[:, :t], impl="recurrent", return_cache=True,
                  **kwargs)
  o, cache = run(at(x, slice(t, None)), lam[:, t:], initial_cache=prefix, impl="recurrent",
                 return_cache=True, **kwargs)
  o_step, cache_step = run_step(at(x, t), lam[:, t], prefix, **kwargs)
  assert_close(o[:, 0], o_step, 1e-14)
  assert_caches_close(cache, cache_step)


def test_p17_return_ordering(rng):
  x, lam = inputs(rng, "mamba2", t=6)
  shapes = lambda **kw: jax.eval_shape(
      functools.partial(dla_attention, capacity=3, impl="recurrent", **kw), *_grad_inputs(x, lam))
  o = shapes()
  assert isinstance(o, jax.ShapeDtypeStruct) and o.shape == x.v.shape
  o1, cache = shapes(return_cache=True)
  o2, aux = shapes(return_aux=True)
  o3, cache3, aux3 = shapes(return_cache=True, return_aux=True)
  assert isinstance(cache, DLACache) and isinstance(cache3, DLACache)
  assert isinstance(aux, DLADecisions) and isinstance(aux3, DLADecisions)
  assert o1 == o2 == o3 == o
  assert aux.boundary.shape == x.g.shape and cache.S.shape == (2, 2, 3, 4, 3)


def test_step_forced_decision(rng):
  """`decision=` forces a boundary and is legalised (empty cache → boundary, merge iff full)."""
  x, lam = inputs(rng, "mamba2", capacity=2, t=4)
  b, h = SHAPE["b"], SHAPE["h"]
  force = lambda boundary, merge: DLADecisions(jnp.full((b, h), boundary), jnp.zeros((b, h)),
                                               jnp.full((b, h), merge, jnp.int32),
                                               jnp.zeros((b, h), jnp.int32))
  cache = DLACache.empty(b, h, 2, SHAPE["dk"], SHAPE["dv"], jnp.float64)
  expected_m = [1, 2, 2, 2]
  decisions = [force(False, 5), force(True, -1), force(True, -1), force(True, 7)]
  for t, (decision, m) in enumerate(zip(decisions, expected_m)):
    _, cache, record = run_step(at(x, t), lam[:, t], cache, capacity=2, decision=decision,
                                return_aux=True)
    np.testing.assert_array_equal(record.num_slots, m)
    np.testing.assert_array_equal(record.merge_idx, 0 if t >= 2 else -1)


# ---------------------------------------------------------------------------------------------
# Input validation.


def _cache(b=2, h=2, capacity=3, dk=4, dv=3):
  return DLACache.empty(b, h, capacity, dk, dv, jnp.float64)


def _decisions(shape, merge_dtype=jnp.int32):
  return DLADecisions(jnp.zeros(shape, bool), jnp.zeros(shape), jnp.zeros(shape, merge_dtype),
                      jnp.zeros(shape, jnp.int32))


BAD_CALLS = {  # name -> (x, lam, kwargs) -> (x', lam', kwargs'), pattern after "dla_attention: "
    "capacity_1": (lambda x, l, kw: (x, l[..., :1], {**kw, "capacity": 1}),
                   "capacity must be >= 2, got 1"),
    "capacity_float": (lambda x, l, kw: (x, l, {**kw, "capacity": 3.0}),
                       "capacity must be a Python int, got float"),
    "lam_rank": (lambda x, l, kw: (x, l[..., 0], kw), r"lam must have shape \[B, T, H, Klam\]"),
    "lam_batch": (lambda x, l, kw: (x, l[:, :-1], kw), r"lam must have shape"),
    "lam_too_long": (lambda x, l, kw: (x, jnp.ones((2, 7, 2, 4), jnp.float64), kw),
                     r"lam's last dim Klam must be in \[1, capacity=3\], got 4"),
    "lam_int": (lambda x, l, kw: (x, l.astype(jnp.int32), kw), "lam must be floating point"),
    "score_ref": (lambda x, l, kw: (x, l, {**kw, "score_ref": "base"}),
                  r"score_ref must be one of \('open', 'total'\), got 'base'"),
    "segment_shape": (lambda x, l, kw: (x, l, {**kw, "segment_ids": jnp.zeros((2, 6), jnp.int32)}),
                      r"segment_ids must have shape \(2, 7\)"),
    "segment_float": (lambda x, l, kw: (x, l, {**kw, "segment_ids": jnp.zeros((2, 7))}),
                      "segment_ids must be integer"),
    "cache_type": (lambda x, l, kw: (x, l, {**kw, "initial_cache": (1, 2)}),
                   "cache must be a DLACache, got tuple"),
    "cache_capacity": (lambda x, l, kw: (x, l, {**kw, "initial_cache": _cache(capacity=4)}),
                       r"cache capacity \(4,\) does not match capacity=3"),
    "cache_dims": (lambda x, l, kw: (x, l, {**kw, "initial_cache": _cache(dk=5)}),
                   r"cache.S must have shape \(2, 2, 3, 4, 3\)"),
    "cache_batch": (lambda x, l, kw: (x, l, {**kw, "initial_cache": _cache(b=1)}),
                    r"cache.S must have shape"),
    "decisions_type": (lambda x, l, kw: (x, l, {**kw, "decisions": (1,)}),
                       "decisions must be a DLADecisions"),
    "decisions_shape": (lambda x, l, kw: (x, l, {**kw, "decisions": _decisions((2, 7, 1))}),
                        r"decisions.boundary must have shape \(2, 7, 2\)"),
    "decisions_merge_float": (
        lambda x, l, kw: (x, l, {**kw, "decisions": _decisions((2, 7, 2), jnp.float32)}),
        "decisions.merge_idx must be integer"),
    "masked_initial_cache": (
        lambda x, l, kw: (x, l, {**kw, "impl": "masked", "initial_cache": _cache()}),
        "impl='masked' supports neither initial_cache nor return_cache"),
    "masked_return_cache": (lambda x, l, kw: (x, l, {**kw, "impl": "masked", "return_cache": True}),
                            "impl='masked' supports neither"),
    "impl": (lambda x, l, kw: (x, l, {**kw, "impl": "fast"}), "impl must be None or one of"),
    "chunk_size": (lambda x, l, kw: (x, l, {**kw, "chunk_size": 0}), r"chunk_size must be in"),
    "q_k_mismatch": (lambda x, l, kw: (x._replace(k=x.k[..., :-1]), l, kw),
                     "q and k must have the same shape"),
    "beta_shape": (lambda x, l, kw: (x._replace(beta=x.beta[..., :1]), l, kw),
                   r"beta must have shape"),
}


@pytest.mark.parametrize("name", BAD_CALLS.keys())
def test_bad_inputs_raise(rng, name):
  mutate, pattern = BAD_CALLS[name]
  x, lam = inputs(rng, "gdn", t=7)
  x, lam, kwargs = mutate(x, lam, {"capacity": 3, "impl": "recurrent"})
  with pytest.raises(ValueError, match=f"dla_attention: {pattern}"):
    dla_attention(x.q, x.k, x.v, x.g, lam, x.beta, **kwargs)


BAD_STEPS = {  # name -> (q, k, v, g, lam, cache, kwargs) mutation, pattern after "dla_step: "
    "rank": (lambda a, kw: ((a[0][None], *a[1:]), kw), r"q must have rank 3 \[B, H, D\]"),
    "cache_type": (lambda a, kw: ((*a[:5], None), kw), "cache must be a DLACache, got NoneType"),
    "capacity_mismatch": (lambda a, kw: (a, {**kw, "capacity": 4}),
                          r"cache capacity \(3,\) does not match capacity=4"),
    "capacity_1": (lambda a, kw: (a, {**kw, "capacity": 1}), "capacity must be >= 2"),
    "lam_shape": (lambda a, kw: ((*a[:4], a[4][:, :1], a[5]), kw),
                  r"lam must have shape \[B, H, Klam\]"),
    "decision_shape": (lambda a, kw: (a, {**kw, "decision": _decisions((2, 2, 1))}),
                       r"decision.boundary must have shape \(2, 2\)"),
}


@pytest.mark.parametrize("name", BAD_STEPS.keys())
def test_bad_step_inputs_raise(rng, name):
  mutate, pattern = BAD_STEPS[name]
  x, lam = inputs(rng, "mamba2", t=1)
  args = (*(a[:, 0] for a in (x.q, x.k, x.v, x.g, lam)), _cache())
  args, kwargs = mutate(args, {})
  with pytest.raises(ValueError, match=f"dla_step: {pattern}"):
    dla_step(*args, **kwargs)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_debug_mode_rejects_illegal_injected_merges(rng, backbone):
  """§5.4: with debug=True, recorded decisions pass; a merge on a non-full cache, a missing merge
  on a full one, and a non-boundary on an empty cache are rejected with the offending token."""
  x, lam = make_inputs(rng, 1, 24, 2, 4, 3, 3, backbone=backbone)
  args = (x.q, x.k, x.v, x.g, lam, x.beta)
  _, aux = dla_attention(*args, tau=0.3, capacity=3, impl="recurrent", return_aux=True)
  merges = np.argwhere(np.asarray(aux.merge_idx) >= 0)
  assert len(merges), f"no capacity merge occurred; seed={seed_of(rng)}"
  dla_attention(*args, tau=0.3, capacity=3, impl="recurrent", decisions=aux, debug=True)

  b_, t_, h_ = merges[0]
  missing = aux._replace(merge_idx=aux.merge_idx.at[b_, t_, h_].set(-1))
  early = aux._replace(boundary=aux.boundary.at[0, 1, 0].set(True),
                       merge_idx=aux.merge_idx.at[0, 1, 0].set(0))
  empty = aux._replace(boundary=aux.boundary.at[0, 0, 1].set(False))
  for bad, where in ((missing, f"token {t_}, head {h_}"), (early, "token 1, head 0"),
                     (empty, "token 0, head 1")):
    with pytest.raises(ValueError, match=f"illegal injected decision at batch 0, {where}"):
      dla_attention(*args, tau=0.3, capacity=3, impl="chunked", decisions=bad, debug=True)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_straight_through_decision_grad(rng, backbone):
  """§4.3 "straight_through" (masked reference): the forward equals the hard one, λ-gradients are
  unchanged, and the extra input gradient is Σ_u ∂L/∂b_u · σ′ · ∂I_u/∂x with the spec's
  ∂L/∂b_u = Σ_{t≥u} Σ_{s<u, s in the open block at u−1} ∂L/∂Λ[t,s] (λ_{t,r₀+1} − λ_{t,r₀})."""
  from dlax.ops.dla.naive import base_attention_matrix, dla_recurrent
  tau, temp, cap, t = 0.45, 0.1, 3, 12
  x, lam = make_inputs(rng, 1, t, 2, 3, 3, 3, backbone=backbone)
  d_out = jnp.asarray(rng.standard_normal(x.v.shape), jnp.float64)
  inputs = (x.q, x.k, x.v, x.g, x.beta)

  def loss(inputs, lam, mode):
    o = dla_attention(*inputs[:4], lam, inputs[4], tau=tau, capacity=cap, impl="masked",
                      decision_grad=mode, temperature=temp)
    return jnp.sum(o * d_out), o

  (l_st, o_st), g_st = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(inputs, lam,
                                                                          "straight_through")
  (l_hard, o_hard), g_hard = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(inputs, lam,
                                                                              "none")
  msg = f"seed={seed_of(rng)}"
  np.testing.assert_array_equal(o_st, o_hard, err_msg=msg)
  assert_close(g_st[1], g_hard[1], 1e-12, msg)

  # The spec's ∂L/∂b_u, by explicit loops over the recorded history.
  def scores(inputs):
    _, _, rec = dla_recurrent(*inputs[:4], lam, inputs[4], tau=tau, capacity=cap, scale=1.0,
                              score_grad=True)
    return rec.score, rec

  score, vjp, rec = jax.vjp(scores, inputs, has_aux=True)
  lo_t, m_t, boundary, _ = replay_blocks(rec.boundary, rec.merge_idx, capacity=cap)
  rank = np.asarray(rank_matrix(lo_t, m_t))[0]                                # [H, T, T]
  a_base = np.asarray(base_attention_matrix(x.q, x.k, x.g, x.beta, scale=1.0))[0]
  d_lam_matrix = a_base * np.einsum("thv,shv->hts", np.asarray(d_out)[0], np.asarray(x.v)[0])
  lam_np, b_np = np.asarray(lam)[0], np.asarray(boundary)[0]
  lo_np, m_np = np.asarray(lo_t)[0], np.asarray(m_t)[0]
  clip = lambda r: min(max(r, 0), lam_np.shape[-1] - 1)
  d_b = np.zeros((t, 2))
  for h in range(2):
    for u in range(1, t):
      open_lo = lo_np[u - 1, h, m_np[u - 1, h] - 1]
      for tt in range(u, t):
        for s in range(open_lo, u):
          r0 = rank[h, tt, s] - int(b_np[u, h])
          d_b[u, h] += d_lam_matrix[h, tt, s] * (lam_np[tt, h, clip(r0 + 1)]
                                                  - lam_np[tt, h, clip(r0)])
  assert np.abs(d_b).max() > 0, msg
  p = jax.nn.sigmoid((score - tau) / temp)
  (extra,) = vjp(jnp.asarray(d_b[None], jnp.float64) * p * (1 - p) / temp)
  for name, a, h, e in zip("q k v g beta".split(), g_st[0], g_hard[0], extra):
    if a is None:
      continue
    if np.linalg.norm(e) == 0:       # e.g. q, which no score reads
      assert np.linalg.norm(a - h) <= 1e-12 * np.linalg.norm(h), f"{name}: {msg}"
    else:
      assert_close(a - h, e, 1e-8, f"{name}: {msg}")


def test_decision_grad_options_are_checked(rng):
  x, lam = make_inputs(rng, 1, 5, 1, 2, 2, 2, backbone="mamba2")
  args = (x.q, x.k, x.v, x.g, lam)
  with pytest.raises(ValueError, match="decision_grad must be one of"):
    dla_attention(*args, capacity=2, impl="masked", decision_grad="soft")
  with pytest.raises(ValueError, match="exists only in the O\\(T²\\) masked reference"):
    dla_attention(*args, capacity=2, impl="chunked", decision_grad="straight_through")

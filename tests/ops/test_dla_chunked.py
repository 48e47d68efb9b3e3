"""Tests of the chunked DLA path `dla_chunked` (spec dla.md §7) against the recurrent oracle.

Properties of §12: 5 (chunked == recurrent), 12 (prefill + decode, streaming), 13 (segments),
14 (gradients), 16 (low-precision decisions), plus remat, jit and vmap. Both backbones, float64,
random positive λ. The inputs are piecewise stationary (regimes of a few tokens), so that blocks of
several tokens, boundaries and capacity merges all occur.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from _helpers import Inputs, assert_close, seed_of
from dla_helpers import BACKBONES, at, boundary_rate, run, total_merges
from dlax.ops import DLACache, DLADecisions, dla_step
from dlax.ops.dla.chunk_math import chunk_math
from dlax.ops.dla.chunked import dla_chunked
from dlax.ops.dla.naive import dla_recurrent

OPTIONS = ("tau", "capacity", "scale", "score_ref", "eps", "eps_r")
chunked = jax.jit(dla_chunked, static_argnames=OPTIONS + ("chunk_size", "remat_every"))
recurrent = jax.jit(dla_recurrent, static_argnames=OPTIONS)
step = jax.jit(dla_step, static_argnames=OPTIONS)
TOL = 1e-9


def make_inputs(rng, b, t, h, dk, dv, klam, *, backbone, noise=0.6, dtype=jnp.float64):
  """(Inputs, lam) with piecewise-stationary keys and values.

  A new regime starts at each token with probability 0.25; within a regime k and v are a fixed
  random direction plus `noise`·N(0, 1). GDN keys are L2-normalised and β = sigmoid(N(0, 1)).
  g = −softplus(N(0, 1))/3, λ ~ U(0.1, 2).
  """
  regime = np.cumsum(rng.random((b, t, h)) < 0.25, axis=1)[..., None]      # [B, T, H, 1]

  def regimes(d):
    base = rng.standard_normal((b, t, h, d))
    return np.take_along_axis(base, regime, axis=1) + noise * rng.standard_normal((b, t, h, d))

  q = rng.standard_normal((b, t, h, dk))
  k, v = regimes(dk), regimes(dv)
  g = -np.logaddexp(0.0, rng.standard_normal((b, t, h))) / 3
  beta = None
  if backbone == "gdn":
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))
  lam = rng.uniform(0.1, 2.0, (b, t, h, klam))
  x = Inputs(q, k, v, g, beta).astype(dtype)
  return x, jnp.asarray(lam, dtype)


def run_chunked(x: Inputs, lam, **kwargs):
  return chunked(x.q, x.k, x.v, x.g, lam, x.beta, **kwargs)


def run_recurrent(x: Inputs, lam, **kwargs):
  return recurrent(x.q, x.k, x.v, x.g, lam, x.beta, **kwargs)


def assert_runs_equal(actual, expected, msg="", rtol=TOL):
  """(o, cache, decisions) agree: floats to `rtol`, integers and booleans exactly."""
  o, cache, aux = actual
  o_e, cache_e, aux_e = expected
  assert_close(o, o_e, rtol, f"{msg} o")
  for name, a, e in [*((f"cache.{f}", getattr(cache, f), getattr(cache_e, f))
                       for f in DLACache._fields),
                     *((f"aux.{f}", getattr(aux, f), getattr(aux_e, f))
                       for f in DLADecisions._fields)]:
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape and a.dtype == e.dtype, f"{msg} {name}: {a.dtype}{a.shape}"
    if np.issubdtype(a.dtype, np.floating):
      np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * max(np.abs(e).max(), 1.0),
                                 err_msg=f"{msg} {name}")
    else:
      np.testing.assert_array_equal(a, e, err_msg=f"{msg} {name}")


def concat_time(*parts):
  return jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *parts)


# ---------------------------------------------------------------------------------------------
# P5: chunked == recurrent.

# (T, C, K, Kλ, τ, score_ref): every C in {1, 3, 4, 7, 8, 16, 64, ≥T}, K in {2, 3, 4, 6, ≥T},
# τ in {0.2, 0.3, 0.5, 0.6, 0.8}; most C do not divide T.
P5_CASES = [
    (37, 1, 2, 2, 0.3, "open"),
    (37, 3, 3, 3, 0.5, "total"),
    (45, 4, 4, 2, 0.6, "open"),
    (45, 7, 6, 4, 0.8, "total"),
    (50, 8, 3, 3, 0.2, "open"),
    (61, 16, 6, 6, 0.6, "total"),
    (70, 64, 4, 3, 0.5, "open"),
    (29, 32, 40, 5, 0.3, "total"),     # C ≥ T and K ≥ T (DLA(I): no merges)
    (33, 7, 33, 4, 0.8, "open"),       # K = T
]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("t,c,capacity,klam,tau,score_ref", P5_CASES,
                         ids=[f"T{t}-C{c}-K{k}-tau{tau}-{r}" for t, c, k, _, tau, r in P5_CASES])
def test_p5_chunked_equals_recurrent(rng, backbone, t, c, capacity, klam, tau, score_ref):
  x, lam = make_inputs(rng, 2, t, 2, 4, 3, klam, backbone=backbone)
  options = dict(tau=tau, capacity=capacity, scale=0.7, score_ref=score_ref)
  expected = run_recurrent(x, lam, **options)
  actual = run_chunked(x, lam, chunk_size=c, **options)
  msg = f"seed={seed_of(rng)}"
  assert_runs_equal(actual, expected, msg)
  aux = expected[2]
  assert 0.0 < boundary_rate(aux) < 1.0, f"{msg}: boundary rate {boundary_rate(aux)}"
  if capacity < t:
    assert total_merges(aux) > 0, f"{msg}: no capacity merge occurred"
  else:
    assert total_merges(aux) == 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p5_long_sequence(rng, backbone):
  """T = 500 with the acceptance chunk sizes C in {1, 7, 16, 64}; the open-slot score (§6.3)."""
  x, lam = make_inputs(rng, 1, 500, 2, 8, 8, 4, backbone=backbone)
  options = dict(tau=0.6, capacity=6, scale=0.5, score_ref="open")
  expected = run_recurrent(x, lam, **options)
  assert total_merges(expected[2]) > 50 and boundary_rate(expected[2]) < 0.9
  for c in (1, 7, 16, 64):
    assert_runs_equal(run_chunked(x, lam, chunk_size=c, **options), expected,
                      f"C={c} seed={seed_of(rng)}")


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("score_ref", ["open", "total"])
def test_p5_injected_random_decisions(rng, backbone, score_ref):
  """Arbitrary forced boundaries and merge indices (legalised identically by both paths; token 0
  meets an empty cache and opens a state with score τ even when forced not to)."""
  b, t, h, capacity = 2, 40, 2, 4
  x, lam = make_inputs(rng, b, t, h, 4, 3, 3, backbone=backbone)
  decisions = DLADecisions(
      boundary=jnp.asarray(rng.random((b, t, h)) < 0.4),
      score=jnp.zeros((b, t, h), jnp.float64),
      merge_idx=jnp.asarray(rng.integers(-1, capacity, (b, t, h)), jnp.int32),
      num_slots=jnp.zeros((b, t, h), jnp.int32))
  decisions = decisions._replace(boundary=decisions.boundary.at[:, 0].set(False))
  options = dict(tau=0.5, capacity=capacity, scale=1.0, score_ref=score_ref, decisions=decisions)
  expected = run_recurrent(x, lam, **options)
  assert_runs_equal(run_chunked(x, lam, chunk_size=6, **options), expected,
                    f"seed={seed_of(rng)}")
  aux = expected[2]
  assert np.all(aux.boundary[:, 0]) and np.allclose(aux.score[:, 0], 0.5)
  assert total_merges(aux) > 0


# ---------------------------------------------------------------------------------------------
# P12: prefill + decode, streaming.


@pytest.mark.parametrize("backbone", BACKBONES)
def test_p12_prefill_then_decode(rng, backbone):
  b, t, h, capacity = 1, 48, 3, 3
  x, lam = make_inputs(rng, b, t, h, 4, 3, 2, backbone=backbone)
  options = dict(tau=0.6, capacity=capacity, scale=0.8, score_ref="open")
  o_full, cache_full, aux = run_recurrent(x, lam, **options)
  boundary, merges = np.asarray(aux.boundary), np.asarray(aux.merge_idx) >= 0
  mid_block = next(p for p in range(20, t - 4) if not boundary[:, p].any())   # every head
  first_merge = next(p for p in range(20, t - 4) if merges[:, p].any())
  for split in (mid_block, first_merge):
    msg = f"split={split} seed={seed_of(rng)}"
    o, cache, _ = run_chunked(at(x, slice(None, split)), lam[:, :split], chunk_size=8,
                              **options)
    outs = [o]
    for i in range(split, t):
      x_i = at(x, i)
      o_i, cache = step(x_i.q, x_i.k, x_i.v, x_i.g, lam[:, i], cache, x_i.beta, **options)
      outs.append(o_i[:, None])
    assert_close(jnp.concatenate(outs, axis=1), o_full, TOL, msg)
    for field in DLACache._fields:
      np.testing.assert_allclose(getattr(cache, field), getattr(cache_full, field), rtol=TOL,
                                 atol=TOL, err_msg=f"{msg} {field}")


@pytest.mark.parametrize("backbone,score_ref", [("mamba2", "total"), ("gdn", "open")])
def test_p12_streaming_equals_one_call(rng, backbone, score_ref):
  """Calls of 13, 1 and 34 tokens with different chunk sizes, each continuing the cache."""
  x, lam = make_inputs(rng, 2, 48, 2, 4, 3, 3, backbone=backbone)
  options = dict(tau=0.5, capacity=3, scale=1.0, score_ref=score_ref)
  expected = run_chunked(x, lam, chunk_size=8, **options)
  assert_runs_equal(expected, run_recurrent(x, lam, **options), f"seed={seed_of(rng)}")
  cache, outs, records = None, [], []
  for (start, stop), c in zip([(0, 13), (13, 14), (14, 48)], (4, 8, 16)):
    o, cache, aux = run_chunked(at(x, slice(start, stop)), lam[:, start:stop], chunk_size=c,
                                initial_cache=cache, **options)
    outs.append(o)
    records.append(aux)
  assert_runs_equal((jnp.concatenate(outs, axis=1), cache, concat_time(*records)), expected,
                    f"streaming seed={seed_of(rng)}")


# ---------------------------------------------------------------------------------------------
# P13: packed segments.


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("score_ref", ["open", "total"])
def test_p13_segments_equal_separate_runs(rng, backbone, score_ref):
  """Row 0 resets inside chunks (5, 17, 30) and at a chunk start (16, a one-token segment); row
  1 at chunk starts (8, 24) and inside one (30). Segment ids are reused (only changes matter).

  The separate runs are one batched recurrent call over every segment, each continued by the
  tokens that follow it up to the longest length (causality makes the extra tokens harmless);
  the last segments of both rows are the longest, so their final caches are exact.
  """
  t, c, capacity, length = 48, 8, 3, 18
  starts = [(0, 5, 16, 17, 30), (0, 8, 24, 30)]
  ids = np.zeros((2, t), np.int32)
  for row, row_starts in enumerate(starts):
    for i, s in enumerate(row_starts):
      ids[row, s:] = i % 2
  x, lam = make_inputs(rng, 2, t, 2, 4, 3, 3, backbone=backbone)
  options = dict(tau=0.5, capacity=capacity, scale=1.0, score_ref=score_ref)
  o, cache, aux = run_chunked(x, lam, chunk_size=c, segment_ids=jnp.asarray(ids), **options)
  assert_runs_equal((o, cache, aux),
                    run_recurrent(x, lam, segment_ids=jnp.asarray(ids), **options),
                    f"packed seed={seed_of(rng)}")

  segments = [(row, start, stop) for row, row_starts in enumerate(starts)
              for start, stop in zip(row_starts, (*row_starts[1:], t))]
  take = lambda a: None if a is None else jnp.concatenate(
      [a[row:row + 1, start:start + length] for row, start, _ in segments])
  o_s, cache_s, aux_s = run_recurrent(x.map(take), take(lam), **options)
  for i, (row, start, stop) in enumerate(segments):
    msg = f"row={row} segment=[{start}, {stop}) seed={seed_of(rng)}"
    n = stop - start
    assert_close(o[row, start:stop], o_s[i, :n], TOL, msg)
    for field in ("boundary", "merge_idx", "num_slots"):
      np.testing.assert_array_equal(getattr(aux, field)[row, start:stop],
                                    getattr(aux_s, field)[i, :n], err_msg=f"{msg} {field}")
    if stop == t:                                                   # final cache of the row
      live = np.arange(capacity) < np.asarray(cache_s.m[i])[..., None]
      np.testing.assert_array_equal(cache.lo[row], np.where(live, cache_s.lo[i] + start, 0),
                                    err_msg=msg)
      for field in ("S", "n", "info", "m", "open_sq", "total_sq"):
        np.testing.assert_allclose(getattr(cache, field)[row], getattr(cache_s, field)[i],
                                   rtol=TOL, atol=TOL, err_msg=f"{msg} cache.{field}")


def test_chunk_math_segment_masks(rng):
  """A reset splits the chunk: the quantities of each part equal those of the part alone."""
  c, r = 7, 3
  x, _ = make_inputs(rng, 1, c, 1, 4, 3, 1, backbone="gdn")
  q, k, g, beta = (jnp.moveaxis(a, 2, 1)[0, 0] for a in (x.q, x.k, x.g, x.beta))
  resets = jnp.zeros(c, bool).at[r].set(True)
  math = jax.jit(functools.partial(chunk_math, scale=0.5))
  whole = math(q, k, g, beta, resets)
  head, tail = math(q[:r], k[:r], g[:r], beta[:r]), math(q[r:], k[r:], g[r:], beta[r:])
  for name in ("a_in", "a_kk"):
    a = getattr(whole, name)
    np.testing.assert_allclose(a[:r, :r], getattr(head, name), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(a[r:, r:], getattr(tail, name), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(a[r:, :r], 0.0)
  np.testing.assert_allclose(whole.q_tilde[:r], head.q_tilde, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(whole.q_tilde[r:], 0.0)
  np.testing.assert_array_equal(whole.k_tilde[r:], 0.0)
  np.testing.assert_allclose(whole.k_hat[r:], tail.k_hat, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# P14: gradients with frozen decisions; remat.


def _grad_setup(rng, backbone, t=40, capacity=3):
  """Inputs, an initial cache (a recurrent prefill of 9 tokens), frozen decisions, cotangents."""
  x, lam = make_inputs(rng, 1, t + 9, 2, 4, 3, 2, backbone=backbone)
  options = dict(tau=0.5, capacity=capacity, scale=0.7, score_ref="open")
  _, cache0, _ = run_recurrent(at(x, slice(None, 9)), lam[:, :9], **options)
  x, lam = at(x, slice(9, None)), lam[:, 9:]
  _, _, aux = run_recurrent(x, lam, initial_cache=cache0, **options)
  assert total_merges(aux) > 0
  cot_o = jnp.asarray(rng.standard_normal(x.v.shape), jnp.float64)
  cot_s = jnp.asarray(rng.standard_normal(cache0.S.shape), jnp.float64)
  args = (x.q, x.k, x.v, x.g, lam, x.beta, cache0.S)
  return args, cache0, {**options, "decisions": aux}, (cot_o, cot_s)


def _loss(fn, cache0, cotangents, **options):
  """`Σ o·W + Σ S_final·W′` as a function of (q, k, v, g, lam, beta, S0), with the run as aux."""

  def loss(q, k, v, g, lam, beta, s0):
    out = fn(q, k, v, g, lam, beta, initial_cache=cache0._replace(S=s0), **options)
    return jnp.sum(out[0] * cotangents[0]) + jnp.sum(out[1].S * cotangents[1]), out

  return loss


def _grads(fn, args, cache0, cotangents, **options):
  """(gradients wrt the non-None args, (o, cache, decisions) of the forward run)."""
  argnums = tuple(i for i, a in enumerate(args) if a is not None)
  loss = _loss(fn, cache0, cotangents, **options)
  grads, out = jax.jit(jax.grad(loss, argnums, has_aux=True))(*args)
  return grads, out


# Every C for GDN; Mamba-2 (the δ = 0 special case of the same code) at a short and a long chunk.
GRAD_CASES = [("gdn", (1, 7, 16, 64)), ("mamba2", (7, 64))]


@pytest.mark.parametrize("backbone,chunk_sizes", GRAD_CASES, ids=[b for b, _ in GRAD_CASES])
def test_p14_gradients_match_recurrent(rng, backbone, chunk_sizes):
  """d/d(q, k, v, g, λ, β, S0) of `Σ o·W + Σ S_final·W′` with frozen decisions, T = 40.

  Only live slots of S0 are compared: slots ≥ m⁰ are zero by the cache invariant, and the
  chunked path ignores their content (zero gradient) where the oracle would carry it along.
  """
  args, cache0, options, cotangents = _grad_setup(rng, backbone)
  expected, _ = _grads(dla_recurrent, args, cache0, cotangents, **options)
  live = (np.arange(options["capacity"]) < np.asarray(cache0.m)[..., None])[..., None, None]
  names = [n for n, a in zip(("q", "k", "v", "g", "lam", "beta", "S0"), args) if a is not None]
  for c in chunk_sizes:
    actual, _ = _grads(functools.partial(dla_chunked, chunk_size=c), args, cache0, cotangents,
                       **options)
    for name, a, e in zip(names, actual, expected):
      msg = f"d/d{name} C={c} seed={seed_of(rng)}"
      if name == "S0":
        np.testing.assert_array_equal(np.where(live, 0.0, a), 0.0, err_msg=msg)
        a, e = np.where(live, a, 0.0), np.where(live, e, 0.0)
      assert np.all(np.isfinite(a)) and np.any(e != 0), msg
      assert_close(a, e, 1e-8, msg)


def test_p14_check_grads(rng):
  """Finite differences on a tiny GDN problem (2 chunks, capacity merges) with frozen decisions."""
  x, lam = make_inputs(rng, 1, 6, 1, 3, 2, 2, backbone="gdn")
  options = dict(tau=0.4, capacity=2, scale=1.0, score_ref="open")
  _, _, aux = run_recurrent(x, lam, **options)
  assert total_merges(aux) > 0, f"seed={seed_of(rng)}"

  @jax.jit
  def fn(q, k, v, g, lam, beta):
    o, cache, _ = dla_chunked(q, k, v, g, lam, beta, chunk_size=4, decisions=aux, **options)
    return o, cache.S

  check_grads(fn, (x.q, x.k, x.v, x.g, lam, x.beta), order=1, modes=("rev",))


def test_remat_every_gives_identical_results(rng):
  """9 chunks of 4 tokens in checkpoint groups of 1 chunk, or of at most 8 (2 groups of 5, the
  last chunk fully padded): identical outputs, caches, decisions and gradients."""
  args, cache0, options, cotangents = _grad_setup(rng, "gdn", t=36)
  (grads_1, run_1), (grads_8, run_8) = (
      _grads(functools.partial(dla_chunked, chunk_size=4, remat_every=every), args, cache0,
             cotangents, **options) for every in (1, 8))
  msg = f"seed={seed_of(rng)}"
  assert_runs_equal(run_8, run_1, msg, rtol=1e-14)
  for a, e in zip(grads_8, grads_1):
    assert_close(a, e, 1e-12, msg)


# ---------------------------------------------------------------------------------------------
# P16: low precision.


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
def test_p16_low_precision(rng, backbone, dtype, rtol):
  """Decisions agree with float64 wherever |I − τ| > 1e-3; with the float64 decisions injected the
  outputs agree to low-precision tolerance. The reference sees the same (rounded) inputs."""
  tau = 0.5
  x, lam = make_inputs(rng, 2, 48, 2, 8, 8, 3, backbone=backbone, dtype=dtype)
  lam = lam.astype(dtype)
  options = dict(tau=tau, capacity=4, scale=0.5, score_ref="open")
  x64 = x.map(lambda a: a.astype(jnp.float64))
  o_ref, _, aux_ref = run_recurrent(x64, lam.astype(jnp.float64), **options)
  msg = f"{dtype.__name__} seed={seed_of(rng)}"

  o, cache, aux = run_chunked(x, lam, chunk_size=16, **options)
  assert o.dtype == dtype and cache.S.dtype == aux.score.dtype == jnp.float32
  decided = np.abs(np.asarray(aux_ref.score) - tau) > 1e-3
  np.testing.assert_array_equal(np.asarray(aux.boundary)[decided],
                                np.asarray(aux_ref.boundary)[decided], err_msg=msg)
  assert total_merges(aux_ref) > 0

  o_forced, _, _ = run_chunked(x, lam, chunk_size=16, decisions=aux_ref, **options)
  assert_close(o_forced, o_ref, rtol, msg)


# ---------------------------------------------------------------------------------------------
# jit and vmap.


def test_jit_and_vmap(rng):
  """`chunked` is `jax.jit` with static options; vmap over an extra leading axis; the op
  `dla_attention(impl="chunked")` dispatches to `dla_chunked`."""
  x, lam = make_inputs(rng, 2, 21, 2, 4, 3, 3, backbone="gdn")
  options = dict(tau=0.5, capacity=3, scale=1.0, score_ref="total")
  flipped = x.map(lambda a: a[:, ::-1])
  expected = [run_chunked(x, lam, chunk_size=8, **options),
              run_chunked(flipped, lam[:, ::-1], chunk_size=8, **options)]
  assert_runs_equal(expected[0], run_recurrent(x, lam, **options), f"seed={seed_of(rng)}")
  assert_runs_equal(run(x, lam, impl="chunked", chunk_size=8, return_cache=True, return_aux=True,
                        **options), expected[0], "dla_attention", rtol=1e-13)
  stacked = x.map(lambda a: jnp.stack([a, a[:, ::-1]]))
  lam_stacked = jnp.stack([lam, lam[:, ::-1]])
  batched = jax.jit(jax.vmap(functools.partial(dla_chunked, chunk_size=8, **options)))(
      stacked.q, stacked.k, stacked.v, stacked.g, lam_stacked, stacked.beta)
  for e in range(2):
    assert_runs_equal(jax.tree.map(lambda a: a[e], batched), expected[e], f"vmap[{e}]",
                      rtol=1e-13)

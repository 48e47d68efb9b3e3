"""Cases and checks shared by the DLA kernel tests (`test_dla_triton.py`, `test_dla_tpu.py`):
random piecewise-stationary inputs, the public op run with any `impl`, and comparisons of outputs,
caches, decisions and gradients against the float64 recurrent reference."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from _helpers import assert_close
from dlax.ops import DLACache, dla_attention

NAMES = ("q", "k", "v", "g", "lam", "beta", "S0")
OPTIONS = ("tau", "capacity", "chunk_size", "scale", "score_ref", "impl", "remat_every")


class Case(NamedTuple):
  backbone: str
  t: int
  chunk: int
  capacity: int
  klam: int
  tau: float
  score_ref: str = "open"
  b: int = 2
  h: int = 2
  dk: int = 8
  dv: int = 16
  prefix: int = 0              # tokens of a recurrent prefill giving the initial cache
  segments: bool = False       # packed sequences (segment_ids)
  remat: int = 8               # chunks per checkpoint group of the backward


def make_inputs(rng, case: Case, dtype=jnp.float64):
  """(q, k, v, g, lam, beta) over prefix + T tokens: k and v switch regime with probability
  0.25 per token (a random direction plus 0.6·N(0, 1)); g = −softplus(N)/3; λ ~ U(0.1, 2); GDN
  keys L2-normalised and β = sigmoid(N). g stays fp32 (fp64 for the reference)."""
  b, t, h = case.b, case.prefix + case.t, case.h
  regime = np.cumsum(rng.random((b, t, h)) < 0.25, axis=1)[..., None]

  def regimes(d):
    base = rng.standard_normal((b, t, h, d))
    return np.take_along_axis(base, regime, axis=1) + 0.6 * rng.standard_normal((b, t, h, d))

  q = rng.standard_normal((b, t, h, case.dk))
  k, v = regimes(case.dk), regimes(case.dv)
  g = -np.logaddexp(0.0, rng.standard_normal((b, t, h))) / 3
  lam = rng.uniform(0.1, 2.0, (b, t, h, case.klam))
  beta = None
  if case.backbone == "gdn":
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h)))), dtype)
  g_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return (*(jnp.asarray(a, dtype) for a in (q, k, v)), jnp.asarray(g, g_dtype),
          jnp.asarray(lam, dtype), beta)


def segment_ids(rng, case: Case):
  """`[B, T]` ids of 2–4 packed sequences per row."""
  cuts = np.sort(rng.choice(np.arange(1, case.t), size=(case.b, 3), replace=True), axis=1)
  return jnp.asarray((np.arange(case.t)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


def op_options(case: Case, impl: str):
  return dict(tau=case.tau, capacity=case.capacity, chunk_size=case.chunk, scale=0.7,
              score_ref=case.score_ref, impl=impl, remat_every=case.remat)


@functools.partial(jax.jit, static_argnames=OPTIONS)
def run_op(inputs, initial_cache, seg, decisions, **options):
  return dla_attention(*inputs, initial_cache=initial_cache, segment_ids=seg,
                       decisions=decisions, return_cache=True, return_aux=True, **options)


@functools.partial(jax.jit, static_argnames=OPTIONS)
def run_op_grads(inputs, initial_cache, seg, decisions, cot, **options):
  """(o, cache, aux) and the vjp of `Σ o·cot_o + Σ S_final·cot_S` wrt (q, k, v, g, λ, β, S0)."""

  def f(inputs, s0):
    o, cache, aux = dla_attention(*inputs, initial_cache=initial_cache._replace(S=s0),
                                  segment_ids=seg, decisions=decisions, return_cache=True,
                                  return_aux=True, **options)
    return (o, cache.S), (cache, aux)

  (o, s), vjp, (cache, aux) = jax.vjp(f, inputs, initial_cache.S, has_aux=True)
  grads, ds0 = vjp((cot[0].astype(o.dtype), cot[1].astype(s.dtype)))
  return (o, cache, aux), (*grads, ds0)


def setup(rng, case: Case, dtype):
  """Inputs in `dtype`, the float64 reference inputs (the same rounded values), the initial cache
  (a recurrent prefill of `case.prefix` tokens, or None), segment ids (or None)."""
  inputs = make_inputs(rng, case, dtype)
  ref = tuple(None if a is None else a.astype(jnp.float64) for a in inputs)
  cache = None
  if case.prefix:
    head = lambda xs: tuple(None if a is None else a[:, :case.prefix] for a in xs)
    tail = lambda xs: tuple(None if a is None else a[:, case.prefix:] for a in xs)
    _, cache, _ = run_op(head(ref), None, None, None, **op_options(case, "recurrent"))
    inputs, ref = tail(inputs), tail(ref)
  seg = segment_ids(rng, case) if case.segments else None
  return inputs, ref, cache, seg


def assert_same_decisions(aux, aux_ref, msg: str):
  for field in ("boundary", "merge_idx", "num_slots"):
    np.testing.assert_array_equal(np.asarray(getattr(aux, field)),
                                  np.asarray(getattr(aux_ref, field)), err_msg=f"{msg} {field}")


def assert_runs_close(run, run_ref, rtol: float, msg: str):
  """o and every cache field to `rtol` (integers exactly), decisions exactly, scores to rtol."""
  (o, cache, aux), (o_ref, cache_ref, aux_ref) = run, run_ref
  assert_close(o, o_ref, rtol, f"{msg} o")
  for field in DLACache._fields:
    a, e = np.asarray(getattr(cache, field)), np.asarray(getattr(cache_ref, field))
    if np.issubdtype(e.dtype, np.floating) and np.any(e != 0):
      assert_close(a, e, rtol, f"{msg} cache.{field}")
    else:
      np.testing.assert_array_equal(a, e, err_msg=f"{msg} cache.{field}")
  assert_same_decisions(aux, aux_ref, msg)
  assert_close(aux.score, aux_ref.score, rtol, f"{msg} aux.score")


def total_merges(aux) -> int:
  return int(np.sum(np.asarray(aux.merge_idx) >= 0))


def assert_grads_close(grads, grads_ref, cache0, capacity: int, rtol: float, msg: str):
  """Every gradient to `rtol`; S0 on live slots only (the chunked paths give dead slots, which
  hold zeros by the cache invariant, a zero gradient where the oracle carries them along)."""
  live = (np.arange(capacity) < np.asarray(cache0.m)[..., None])[..., None, None]
  for name, a, e in zip(NAMES, grads, grads_ref):
    if e is None:
      assert a is None, f"{msg} d{name}"
      continue
    if name == "S0":
      np.testing.assert_array_equal(np.where(live, 0.0, a), 0.0, err_msg=f"{msg} dS0 dead")
      a, e = np.where(live, a, 0.0), np.where(live, e, 0.0)
    assert_close(a, e, rtol, f"{msg} d{name}")


def cache_or_empty(cache, case: Case, dtype):
  return cache if cache is not None else DLACache.empty(case.b, case.h, case.capacity, case.dk,
                                                        case.dv, dtype)

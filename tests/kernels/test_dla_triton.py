"""Tests of the Triton-lowered Pallas DLA kernels `dlax_kernels.dla_triton`, through the public op
`dla_attention(..., impl="pallas_triton")`: outputs, final caches, decisions and the gradients of
q, k, v, g, λ, β and the initial slot states (cotangents on o and the final slot states) against
the op's float64 recurrent reference (spec dla.md §4.6). Interpret mode on CPU, compiled on a GPU
(`gpu` marker). Inputs are piecewise stationary so that multi-token blocks, boundaries and
capacity merges all occur.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlax.ops import DLACache, DLADecisions, dla_attention
from dlax_kernels import dla_triton

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


def _options(case: Case, impl: str):
  return dict(tau=case.tau, capacity=case.capacity, chunk_size=case.chunk, scale=0.7,
              score_ref=case.score_ref, impl=impl, remat_every=case.remat)


@functools.partial(jax.jit, static_argnames=OPTIONS)
def _run(inputs, initial_cache, seg, decisions, **options):
  return dla_attention(*inputs, initial_cache=initial_cache, segment_ids=seg,
                       decisions=decisions, return_cache=True, return_aux=True, **options)


@functools.partial(jax.jit, static_argnames=OPTIONS)
def _run_grads(inputs, initial_cache, seg, decisions, cot, **options):
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
    _, cache, _ = _run(head(ref), None, None, None, **_options(case, "recurrent"))
    inputs, ref = tail(inputs), tail(ref)
  seg = segment_ids(rng, case) if case.segments else None
  return inputs, ref, cache, seg


def relative_error(actual, expected) -> float:
  actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_close(actual, expected, rtol: float, msg: str):
  shapes = (np.shape(actual), np.shape(expected))
  assert shapes[0] == shapes[1], f"{msg}: shapes {shapes}"
  assert np.all(np.isfinite(np.asarray(actual, np.float64))), f"{msg}: not finite"
  err = relative_error(actual, expected)
  assert err <= rtol, f"{msg}: relative error {err:.2e} > {rtol:.0e}"


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


def _empty_or(cache, case: Case, dtype):
  return cache if cache is not None else DLACache.empty(case.b, case.h, case.capacity, case.dk,
                                                        case.dv, dtype)


# ---------------------------------------------------------------------------------------------
# Forward: decisions, outputs and caches.

FORWARD_CASES = {
    "mamba2_open_T_not_multiple_of_C": Case("mamba2", 37, 8, 3, 3, 0.5),
    "gdn_total_T_lt_C": Case("gdn", 13, 16, 4, 2, 0.3, "total"),
    "gdn_open_K2_many_merges": Case("gdn", 45, 4, 2, 2, 0.6),
    "mamba2_total_K6_prefix": Case("mamba2", 40, 16, 6, 4, 0.6, "total", prefix=7),
}


@pytest.mark.parametrize("case", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_forward_float64_equals_recurrent(rng, case):
  """The algorithm: in float64 (interpret mode) the kernel equals the oracle to 1e-10."""
  inputs, _, cache, _ = setup(rng, case, jnp.float64)
  run_ref = _run(inputs, cache, None, None, **_options(case, "recurrent"))
  run = _run(inputs, cache, None, None, **_options(case, "pallas_triton"))
  assert total_merges(run_ref[2]) > 0
  assert_runs_close(run, run_ref, 1e-10, f"seed={rng.bit_generator.seed_seq.entropy}")


FLOAT32_CASES = {
    "mamba2_open_prefix_segments": Case("mamba2", 50, 16, 3, 2, 0.5, prefix=5, segments=True),
    "gdn_open_prefix_segments": Case("gdn", 41, 8, 4, 3, 0.5, prefix=9, segments=True),
}


@pytest.mark.parametrize("case", FLOAT32_CASES.values(), ids=FLOAT32_CASES.keys())
def test_forward_float32(rng, case):
  """fp32 kernel vs the float64 oracle on the same fp32 values: same decisions, 1e-5."""
  inputs, ref, cache, seg = setup(rng, case, jnp.float32)
  run_ref = _run(ref, cache, seg, None, **_options(case, "recurrent"))
  cache32 = None if cache is None else jax.tree.map(
      lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, cache)
  run = _run(inputs, cache32, seg, None, **_options(case, "pallas_triton"))
  assert run[0].dtype == jnp.float32 and run[1].S.dtype == jnp.float32
  assert total_merges(run_ref[2]) > 0
  assert_runs_close(run, run_ref, 1e-5, f"seed={rng.bit_generator.seed_seq.entropy}")


# ---------------------------------------------------------------------------------------------
# Gradients (decisions frozen: injected from the reference run, so both follow one partition).

GRAD_CASES = {
    "mamba2_prefix_two_value_blocks": Case("mamba2", 40, 16, 3, 2, 0.5, prefix=9, dv=64),
    "gdn_prefix_segments_remat2": Case("gdn", 37, 8, 3, 3, 0.5, prefix=9, segments=True,
                                       remat=2),    # 5 chunks: checkpoint groups of 2, 2, 1
}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_float32(rng, case):
  """d/d(q, k, v, g, λ, β, S0) of `Σ o·W + Σ S_final·W′` in fp32 vs the float64 oracle."""
  inputs, ref, cache, seg = setup(rng, case, jnp.float32)
  cache = _empty_or(cache, case, jnp.float64)
  cot = (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float64),
         jnp.asarray(rng.standard_normal(cache.S.shape), jnp.float64))
  run_ref, grads_ref = _run_grads(ref, cache, seg, None, cot, **_options(case, "recurrent"))
  decisions = run_ref[2]
  assert total_merges(decisions) > 0
  cache32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, cache)
  run, grads = _run_grads(inputs, cache32, seg, decisions, cot,
                          **_options(case, "pallas_triton"))
  msg = f"seed={rng.bit_generator.seed_seq.entropy}"
  assert_runs_close(run, run_ref, 1e-5, msg)
  assert_grads_close(grads, grads_ref, cache, case.capacity, 1e-5, msg)


def test_bfloat16_with_injected_decisions(rng):
  """bf16 inputs with the float64 decisions injected (rounding near τ cannot flip a boundary):
  outputs and gradients within bf16 tolerance of the oracle on the same rounded inputs."""
  case = Case("gdn", 33, 16, 3, 2, 0.5, prefix=6)
  inputs, ref, cache, _ = setup(rng, case, jnp.bfloat16)
  cot = (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float64),
         jnp.asarray(rng.standard_normal(cache.S.shape), jnp.float64))
  run_ref, grads_ref = _run_grads(ref, cache, None, None, cot, **_options(case, "recurrent"))
  assert total_merges(run_ref[2]) > 0
  run, grads = _run_grads(inputs, cache, None, run_ref[2], cot, **_options(case, "pallas_triton"))
  msg = f"seed={rng.bit_generator.seed_seq.entropy}"
  assert run[0].dtype == jnp.bfloat16
  assert_same_decisions(run[2], run_ref[2], msg)
  assert_close(run[0], run_ref[0], 1e-2, f"{msg} o")
  assert_grads_close(grads, grads_ref, cache, case.capacity, 1e-2, msg)


# ---------------------------------------------------------------------------------------------
# Errors.

BAD = {  # name: (chunk, dk, dtype, capacity, score_ref, error pattern)
    "chunk_not_power_of_2": (24, 16, jnp.float32, 3, "open", "chunk_size must be a power of two"),
    "chunk_too_small": (8, 16, jnp.float32, 3, "open", "chunk_size must be a power of two"),
    "head_dim": (16, 24, jnp.float32, 3, "open", "head dim Dk must be a power of two"),
    "dtype": (16, 16, jnp.float64, 3, "open", "q must be bfloat16 or float32"),
    "capacity": (16, 16, jnp.float32, 1, "open", "capacity must be an int >= 2"),
    "score_ref": (16, 16, jnp.float32, 3, "nope", "score_ref must be"),
}


@pytest.mark.parametrize("name", BAD.keys())
def test_unsupported_inputs_raise(name):
  chunk, dk, dtype, capacity, score_ref, pattern = BAD[name]
  q = jnp.zeros((1, 4, 1, dk), dtype)
  v = jnp.zeros((1, 4, 1, 16), dtype)
  lam = jnp.zeros((1, 4, 1, 2), dtype)
  with pytest.raises(ValueError, match=pattern):
    dla_triton._check(q, v, lam, capacity, chunk, score_ref, interpret=False)


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at realistic shapes.


@pytest.mark.gpu
class TestCompiledGPU:
  """Compiled (Triton) kernels. Against the XLA chunked path on the GPU at B=2, T=1000, H=4,
  Dk=128 (both in fp32, decisions injected from the XLA run), and against the float64 oracle at
  the CPU tests' semantics on small power-of-two shapes."""

  @pytest.mark.parametrize("backbone", ["mamba2", "gdn"])
  @pytest.mark.parametrize("dv", [64, 128])
  @pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)],
                           ids=["float32", "bfloat16"])
  def test_realistic_shapes_match_xla(self, rng, backbone, dv, dtype, rtol):
    case = Case(backbone, 1000, 64, 30, 30, 0.6, b=2, h=4, dk=128, dv=dv, prefix=0)
    inputs, ref, _, _ = setup(rng, case, dtype)
    ref32 = tuple(None if a is None else a.astype(jnp.float32) for a in ref)
    cache = DLACache.empty(case.b, case.h, case.capacity, case.dk, case.dv, jnp.float32)
    cot = (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float32),
           jnp.asarray(rng.standard_normal(cache.S.shape), jnp.float32))
    with jax.default_matmul_precision("highest"):          # no TF32 in the XLA reference
      run_ref, grads_ref = _run_grads(ref32, cache, None, None, cot,
                                      **_options(case, "chunked"))
    run, grads = _run_grads(inputs, cache, None, run_ref[2], cot,
                            **_options(case, "pallas_triton"))
    msg = f"{backbone} Dv={dv} {dtype.__name__}"
    assert_close(run[0], run_ref[0], rtol, f"{msg} o")
    assert_close(run[1].S, run_ref[1].S, rtol, f"{msg} S")
    assert_grads_close(grads, grads_ref, cache, case.capacity, rtol, msg)

  @pytest.mark.parametrize("backbone", ["mamba2", "gdn"])
  def test_float32_matches_recurrent(self, rng, backbone):
    case = Case(backbone, 100, 16, 4, 3, 0.5, dk=16, dv=32, prefix=9, segments=True)
    inputs, ref, cache, seg = setup(rng, case, jnp.float32)
    cot = (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float64),
           jnp.asarray(rng.standard_normal(cache.S.shape), jnp.float64))
    run_ref, grads_ref = _run_grads(ref, cache, seg, None, cot, **_options(case, "recurrent"))
    cache32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a,
                           cache)
    run, grads = _run_grads(inputs, cache32, seg, run_ref[2], cot,
                            **_options(case, "pallas_triton"))
    msg = f"{backbone} seed={rng.bit_generator.seed_seq.entropy}"
    assert_runs_close(run, run_ref, 1e-5, msg)
    assert_grads_close(grads, grads_ref, cache, case.capacity, 1e-5, msg)

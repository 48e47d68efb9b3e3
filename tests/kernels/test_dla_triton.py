"""Tests of the Triton-lowered Pallas DLA kernels `dlax_kernels.dla_triton`, through the public op
`dla_attention(..., impl="pallas_triton")`: outputs, final caches, decisions and the gradients of
q, k, v, g, λ, β and the initial slot states (cotangents on o and the final slot states) against
the op's float64 recurrent reference (spec dla.md §4.6). Interpret mode on CPU, compiled on a GPU
(`gpu` marker). Inputs are piecewise stationary so that multi-token blocks, boundaries and
capacity merges all occur.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from _helpers import assert_close
from dla_kernel_cases import (Case, assert_grads_close, assert_runs_close, assert_same_decisions,
                              cache_or_empty, op_options, run_op, run_op_grads, setup,
                              total_merges)
from dlax_kernels import dla_triton

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
  run_ref = run_op(inputs, cache, None, None, **op_options(case, "recurrent"))
  run = run_op(inputs, cache, None, None, **op_options(case, "pallas_triton"))
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
  run_ref = run_op(ref, cache, seg, None, **op_options(case, "recurrent"))
  cache32 = None if cache is None else jax.tree.map(
      lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, cache)
  run = run_op(inputs, cache32, seg, None, **op_options(case, "pallas_triton"))
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
  cache = cache_or_empty(cache, case, jnp.float64)
  cot = (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float64),
         jnp.asarray(rng.standard_normal(cache.S.shape), jnp.float64))
  run_ref, grads_ref = run_op_grads(ref, cache, seg, None, cot, **op_options(case, "recurrent"))
  decisions = run_ref[2]
  assert total_merges(decisions) > 0
  cache32 = jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, cache)
  run, grads = run_op_grads(inputs, cache32, seg, decisions, cot,
                          **op_options(case, "pallas_triton"))
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
  run_ref, grads_ref = run_op_grads(ref, cache, None, None, cot, **op_options(case, "recurrent"))
  assert total_merges(run_ref[2]) > 0
  run, grads = run_op_grads(inputs, cache, None, run_ref[2], cot, **op_options(case, "pallas_triton"))
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


def _to_float32(cache):
  return jax.tree.map(lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, cache)


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
    case = Case(backbone, 1000, 64, 30, 30, 0.6, b=2, h=4, dk=128, dv=dv, prefix=64)
    inputs, ref, cache, _ = setup(rng, case, dtype)
    ref32 = tuple(None if a is None else a.astype(jnp.float32) for a in ref)
    cache = _to_float32(cache)               # a prefilled cache, so that dS0 is not all zeros
    cot = (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float32),
           jnp.asarray(rng.standard_normal(cache.S.shape), jnp.float32))
    with jax.default_matmul_precision("highest"):          # no TF32 in the XLA reference
      run_ref, grads_ref = run_op_grads(ref32, cache, None, None, cot,
                                      **op_options(case, "chunked"))
    run, grads = run_op_grads(inputs, cache, None, run_ref[2], cot,
                            **op_options(case, "pallas_triton"))
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
    run_ref, grads_ref = run_op_grads(ref, cache, seg, None, cot, **op_options(case, "recurrent"))
    cache32 = _to_float32(cache)
    run, grads = run_op_grads(inputs, cache32, seg, run_ref[2], cot,
                            **op_options(case, "pallas_triton"))
    msg = f"{backbone} seed={rng.bit_generator.seed_seq.entropy}"
    assert_runs_close(run, run_ref, 1e-5, msg)
    assert_grads_close(grads, grads_ref, cache, case.capacity, 1e-5, msg)

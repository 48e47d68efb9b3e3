"""Tests of the Triton-lowered Pallas Gated DeltaNet kernels `dlax_kernels.gated_delta_triton`:
outputs, final states and the gradients of q, k, v, g, beta and initial_state (cotangents on both
outputs) against the op's float64 recurrent reference; interpret mode on CPU, compiled on a GPU
(`gpu` marker)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import RTOL, assert_close, random_inputs, random_state, seed_of

from dlax.ops import gated_delta
from dlax_kernels import gated_delta_triton

NAMES = ("q", "k", "v", "g", "beta", "initial_state")
BF16_RTOL = 1e-2


class Case(NamedTuple):
  b: int
  t: int
  h: int
  dk: int
  dv: int
  chunk: int
  with_state: bool = True
  scale: float | None = None


ON_GPU = jax.default_backend() == "gpu"
CASES = {
    "T_not_multiple_of_C": Case(2, 37, 2, 16, 32, 16),
    "T_lt_C_padded_dims": Case(1, 10, 2, 8, 4, 16, with_state=False),
    "C64_four_sub_blocks": Case(1, 150, 1, 32, 16, 64),
    "Dk_ne_Dv_scale": Case(1, 48, 2, 16, 64, 32, scale=0.7),
    "C8_interpret_only": pytest.param(Case(1, 19, 1, 4, 6, 8), marks=pytest.mark.skipif(
        ON_GPU, reason="compiled kernels need chunk_size >= 16")),
}


def _problem(rng, case: Case, dtype):
  """Inputs (g fp32), initial state (or None) and cotangents for (o, final state)."""
  x = random_inputs(rng, case.b, case.t, case.h, case.dk, case.dv, with_beta=True, dtype=dtype)
  s0 = random_state(rng, case.b, case.h, case.dk, case.dv, dtype) if case.with_state else None
  cotangents = (rng.standard_normal((case.b, case.t, case.h, case.dv)),
                rng.standard_normal((case.b, case.h, case.dk, case.dv)))
  return x.args(), s0, cotangents


@functools.partial(jax.jit, static_argnames=("fn", "with_state"))
def _outputs_and_grads(fn, args, s0, cotangents, with_state):
  """(o, final state) and the cotangents of (q, k, v, g, beta[, initial_state])."""
  def run(*a):
    return fn(*a[:5], initial_state=a[5] if with_state else None)

  primals = (*args, s0) if with_state else args
  out, vjp = jax.vjp(run, *primals)
  return out, vjp(tuple(jnp.asarray(c, o.dtype) for c, o in zip(cotangents, out)))


def _compare(rng, case: Case, fn, dtype, rtol):
  args, s0, cotangents = _problem(rng, case, dtype)
  out, grads = _outputs_and_grads(fn, args, s0, cotangents, case.with_state)
  ref_fn = functools.partial(gated_delta, scale=case.scale, impl="recurrent")
  up = lambda x: None if x is None else x.astype(jnp.float64)
  ref_out, ref_grads = _outputs_and_grads(ref_fn, tuple(map(up, args)), up(s0), cotangents,
                                          case.with_state)
  assert out[0].dtype == args[2].dtype and out[1].dtype == jnp.float32, (out[0].dtype, out[1].dtype)
  msg = f"{case} {jnp.dtype(dtype).name} seed={seed_of(rng)}"
  for name, actual, expected in zip(("o", "final_state"), out, ref_out):
    assert_close(actual, expected, rtol, f"{name} {msg}")
  for name, primal, actual, expected in zip(NAMES, (*args, s0), grads, ref_grads):
    assert actual.dtype == primal.dtype, f"d{name} dtype {actual.dtype} != {primal.dtype}"
    assert_close(actual, expected, rtol, f"d{name} {msg}")


def _public_op(case: Case):
  return functools.partial(gated_delta, scale=case.scale, chunk_size=case.chunk,
                           impl="pallas_triton")


def _kernel(case: Case, **kwargs):
  scale = case.dk ** -0.5 if case.scale is None else case.scale
  return functools.partial(gated_delta_triton.gated_delta, scale=scale, chunk_size=case.chunk,
                           **kwargs)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fp32_matches_recurrent(rng, case):
  """Through the public op (`impl="pallas_triton"`): interpreted on CPU, compiled on a GPU."""
  _compare(rng, case, _public_op(case), jnp.float32, RTOL[jnp.float32])


def test_bf16_matches_recurrent(rng):
  case = Case(1, 40, 2, 16, 16, 16)
  _compare(rng, case, _public_op(case), jnp.bfloat16, BF16_RTOL)


def test_dv_blocks_and_warps_do_not_change_results(rng):
  """Dv split over two state-pass programs and over loop blocks in the chunk-parallel kernels."""
  case = Case(1, 40, 1, 16, 32, 16)
  tuning = dict(block_v=16, state_block_v=16, warps=8, bwd_warps=4, state_warps=2)
  _compare(rng, case, _kernel(case, **tuning), jnp.float32, RTOL[jnp.float32])


@pytest.mark.parametrize("chunk", [24, 0, 3])
def test_chunk_not_power_of_two_raises(rng, chunk):
  case = Case(1, 8, 1, 4, 4, chunk)
  args, _, _ = _problem(rng, case, jnp.float32)
  with pytest.raises(ValueError, match=f"chunk_size must be a power of two, got {chunk}"):
    _kernel(case)(*args)


def test_public_op_reports_kernel_chunk_error(rng):
  args, _, _ = _problem(rng, Case(1, 8, 1, 4, 4, 12), jnp.float32)
  with pytest.raises(ValueError, match="pallas_triton.*power of two, got 12"):
    gated_delta(*args, chunk_size=12, impl="pallas_triton")


def test_compiled_chunk_below_16_raises(rng):
  case = Case(1, 8, 1, 4, 4, 8)
  args, _, _ = _problem(rng, case, jnp.float32)
  with pytest.raises(ValueError, match="chunk_size must be >= 16 on GPU"):
    _kernel(case, interpret=False)(*args)


def test_float64_inputs_raise(rng):
  case = Case(1, 8, 1, 4, 4, 16)
  args, _, _ = _problem(rng, case, jnp.float64)
  with pytest.raises(ValueError, match="q must be float32 or bfloat16, got float64"):
    _kernel(case)(*args)


GPU_CASES = {
    "Dv64": Case(2, 1000, 4, 128, 64, 64),
    "Dv128": Case(2, 1000, 4, 128, 128, 64),
    "C32_no_state": Case(2, 1000, 4, 128, 128, 32, with_state=False),
}


@pytest.mark.gpu
class TestCompiledOnGPU:
  """Compiled Triton kernels at realistic shapes against the float64 recurrent reference."""

  @pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
  def test_fp32(self, rng, case):
    _compare(rng, case, _public_op(case), jnp.float32, RTOL[jnp.float32])

  @pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
  def test_bf16(self, rng, case):
    _compare(rng, case, _public_op(case), jnp.bfloat16, BF16_RTOL)

  def test_platform_default_is_the_kernel(self, rng):
    case = Case(1, 100, 2, 64, 64, 64)
    args, s0, _ = _problem(rng, case, jnp.bfloat16)
    expected = _public_op(case)(*args, initial_state=s0)
    actual = gated_delta(*args, initial_state=s0, chunk_size=case.chunk, impl=None)
    for a, e in zip(actual, expected):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))

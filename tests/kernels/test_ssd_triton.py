"""Tests of the Triton-lowered Pallas SSD kernel `dlax_kernels.ssd_triton`: outputs, final states
and the gradients of q, k, v, g and initial_state (cotangents on both outputs) against the op's
float64 recurrent reference; interpret mode on CPU, compiled on a GPU (`gpu` marker)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import assert_close
from dlax.ops import ssd as ssd_op
from dlax_kernels import ssd_triton

NAMES = ("q", "k", "v", "g", "initial_state")


class Case(NamedTuple):
  b: int
  t: int
  h: int
  dk: int
  dv: int
  chunk: int
  with_state: bool = True
  scale: float | None = None


CASES = {
    "T_not_multiple_of_C": Case(2, 37, 2, 8, 16, 16),
    "T_lt_C": Case(1, 10, 2, 16, 8, 16, with_state=False),
    "several_chunks_split_blocks": Case(1, 64, 2, 128, 256, 16),   # K, V split into blocks
    "Dk_ne_Dv_scale": Case(2, 48, 1, 16, 32, 16, scale=0.7),
    "odd_chunk_interpret_only": Case(1, 13, 2, 4, 6, 5),
}


@pytest.fixture(params=["chunk_parallel", "sweep"])
def path(request, monkeypatch):
  """Forces one of the two forward paths, the one-sweep kernel or the state + output passes (the
  heuristic picks by the number of heads); the backward is the same for both."""
  monkeypatch.setattr(ssd_triton, "_SWEEP_MIN_PROGRAMS", 0 if request.param == "sweep" else 2**62)
  return request.param


def make_inputs(rng, case: Case, dtype):
  """(q, k, v, g, initial_state or None): normal q, k, v, state; g = −softplus(z)/2 in fp32."""
  b, t, h, dk, dv = case.b, case.t, case.h, case.dk, case.dv
  q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
  v = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
  g = jnp.asarray(-0.5 * np.logaddexp(0.0, rng.standard_normal((b, t, h))), jnp.float32)
  s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), dtype) if case.with_state else None
  return q, k, v, g, s0


def cotangents(rng, case: Case):
  return (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float64),
          jnp.asarray(rng.standard_normal((case.b, case.h, case.dk, case.dv)), jnp.float64))


def outputs_and_grads(inputs, cot, *, case: Case, impl: str, interpret: bool | None = None):
  """(o, final state) and the vjp with cotangents `cot` for every input (None where absent).
  Jitted afresh per call: the `path` fixture changes what a trace of the kernel contains."""
  *xs, s0 = inputs
  kwargs = dict(scale=case.scale, chunk_size=case.chunk)
  if impl == "kernel":
    scale = case.dk ** -0.5 if case.scale is None else case.scale
    run = functools.partial(ssd_triton.ssd, scale=scale, chunk_size=case.chunk,
                            interpret=interpret)
  else:
    run = functools.partial(ssd_op, impl=impl, **kwargs)

  @jax.jit
  def value_and_vjp(xs, s0, cot):
    out, vjp = jax.vjp(lambda xs, s0: run(*xs, initial_state=s0), xs, s0)
    grads, ds0 = vjp(tuple(c.astype(o.dtype) for c, o in zip(cot, out)))
    return out, (*grads, ds0)

  return value_and_vjp(xs, s0, cot)


def reference(inputs, cot, case: Case):
  upcast = jax.tree.map(lambda x: x.astype(jnp.float64), inputs)
  return outputs_and_grads(upcast, cot, case=case, impl="recurrent")


def check_against_reference(rng, case: Case, dtype, rtol: float, interpret: bool | None = None):
  inputs = make_inputs(rng, case, dtype)
  cot = cotangents(rng, case)
  (o, final), grads = outputs_and_grads(inputs, cot, case=case, impl="kernel",
                                        interpret=interpret)
  (o_ref, final_ref), grads_ref = reference(inputs, cot, case)
  assert o.dtype == dtype and final.dtype == jnp.float32, (o.dtype, final.dtype)
  msg = f"{case} {jnp.dtype(dtype).name}"
  assert_close(o, o_ref, rtol, f"o {msg}")
  assert_close(final, final_ref, rtol, f"final state {msg}")
  for name, x, grad, grad_ref in zip(NAMES, inputs, grads, grads_ref):
    if x is None:
      assert grad is None, name
      continue
    assert grad.dtype == x.dtype, (name, grad.dtype, x.dtype)
    assert_close(grad, grad_ref, rtol, f"d/d{name} {msg}")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_float32_matches_float64_reference(rng, case, path):
  check_against_reference(rng, case, jnp.float32, 1e-5, interpret=True)


def test_bfloat16_matches_float64_reference(rng, path):
  check_against_reference(rng, Case(2, 40, 2, 16, 16, 16), jnp.bfloat16, 1e-2, interpret=True)


def test_output_cotangent_only(rng, path):
  """The final state unused: its cotangent is a symbolic zero."""
  case = Case(1, 24, 2, 16, 16, 16)
  inputs = make_inputs(rng, case, jnp.float32)
  w = jnp.asarray(rng.standard_normal(inputs[2].shape), jnp.float64)

  def loss(impl, q, k, v, g, s0):
    o, _ = ssd_op(q, k, v, g, initial_state=s0, chunk_size=case.chunk, impl=impl)
    return jnp.sum(o * w.astype(o.dtype))

  grad = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3, 4)))
  actual = grad("pallas_triton")(*inputs)
  expected = grad("recurrent")(*(x.astype(jnp.float64) for x in inputs))
  for name, a, e in zip(NAMES, actual, expected):
    assert_close(a, e, 1e-5, f"d/d{name}")


def test_public_op_dispatches_to_kernel(rng, monkeypatch):
  case = Case(2, 21, 2, 16, 32, 16)
  inputs = make_inputs(rng, case, jnp.float32)
  calls, kernel = [], ssd_triton.ssd
  monkeypatch.setattr(ssd_triton, "ssd", lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
  run = lambda impl, q, k, v, g, s0: ssd_op(q, k, v, g, initial_state=s0, chunk_size=case.chunk,
                                            impl=impl)
  actual = run("pallas_triton", *inputs)
  expected = run("recurrent", *(x.astype(jnp.float64) for x in inputs))
  assert len(calls) == 1 and calls[0]["chunk_size"] == case.chunk
  for name, a, e in zip(("o", "final state"), actual, expected):
    assert_close(a, e, 1e-5, name)


POWER_OF_2 = r"must be a power of two in \[16, 256\] on GPU"
BAD_COMPILED_CALLS = {  # (case, dtype, error pattern); checked before lowering, so run on CPU
    "chunk_not_power_of_2": (Case(1, 8, 1, 16, 16, 24), jnp.float32,
                             rf"chunk_size {POWER_OF_2}, got 24"),
    "chunk_below_16": (Case(1, 8, 1, 16, 16, 8), jnp.float32, rf"chunk_size {POWER_OF_2}, got 8"),
    "head_dim_not_power_of_2": (Case(1, 8, 1, 24, 16, 16), jnp.float32,
                                rf"head dim Dk {POWER_OF_2}, got 24"),
    "value_dim_too_large": (Case(1, 8, 1, 16, 512, 16), jnp.float32,
                            rf"head dim Dv {POWER_OF_2}, got 512"),
    "float64": (Case(1, 8, 1, 16, 16, 16), jnp.float64,
                r"inputs must be bfloat16, float16 or float32 on GPU, got float64"),
    "shared_memory": (Case(1, 8, 1, 128, 128, 128), jnp.float32,
                      r"chunk_size 128 with Dk=128 in float32 needs more GPU shared memory"),
}


@pytest.mark.parametrize("name", BAD_COMPILED_CALLS.keys())
def test_unsupported_compiled_inputs_raise(rng, name):
  case, dtype, pattern = BAD_COMPILED_CALLS[name]
  q, k, v, g, _ = make_inputs(rng, case, dtype)
  with pytest.raises(ValueError, match=r"ssd \(pallas_triton\): " + pattern):
    ssd_triton.ssd(q, k, v, g, scale=1.0, chunk_size=case.chunk, interpret=False)


def test_bad_chunk_size_through_op_raises(rng):
  q, k, v, g, _ = make_inputs(rng, Case(1, 8, 1, 4, 4, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"ssd: chunk_size must be in \[1, 256\], got 0"):
    ssd_op(q, k, v, g, chunk_size=0, impl="pallas_triton")


@pytest.mark.gpu
class TestCompiledOnGPU:
  """Compiled Triton kernels at realistic shapes against the float64 reference on the GPU."""

  @pytest.mark.parametrize("dv", [64, 128])
  @pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)],
                           ids=["float32", "bfloat16"])
  def test_matches_reference(self, rng, dv, dtype, rtol):
    check_against_reference(rng, Case(2, 1000, 4, 128, dv, 64), dtype, rtol)

  def test_no_initial_state_chunk_128(self, rng):
    check_against_reference(rng, Case(1, 300, 2, 64, 128, 128, with_state=False),
                            jnp.bfloat16, 1e-2)

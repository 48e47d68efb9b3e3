"""Acceptance suite shared by the linear-attention ops. Each op's test file subclasses
`OpAcceptance`, setting `spec` and implementing `numpy_reference` (an independent float64 loop)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from _helpers import RTOL, Inputs, OpSpec, assert_close, assert_trees_close, random_state, seed_of

IMPLS = ("recurrent", "masked", "chunked")


class Case(NamedTuple):
  b: int
  t: int
  h: int
  dk: int
  dv: int
  chunk_size: int
  with_state: bool = True
  scale: float | None = None

  @property
  def shape(self):
    return self.b, self.t, self.h, self.dk, self.dv


AGREE_CASES = {
    "T_not_multiple_of_C": Case(2, 37, 3, 8, 8, 8),
    "C_ge_T": Case(1, 20, 2, 4, 6, 32, with_state=False),
    "C_1": Case(1, 13, 2, 4, 4, 1),
    "C_256_long": Case(1, 300, 2, 8, 8, 256),
    "tiny": Case(1, 1, 1, 1, 1, 64),
    "large": Case(2, 130, 4, 32, 16, 16),
    "Dk_ne_Dv_scale": Case(2, 48, 2, 16, 8, 16, with_state=False, scale=0.7),
}

GRAD_CASES = {
    "T_not_multiple_of_C": Case(2, 37, 2, 8, 6, 8),
    "C_ge_T": Case(1, 12, 1, 4, 4, 16, with_state=False),
    "C_1": Case(1, 9, 2, 3, 5, 1),
    "T_130": Case(1, 130, 2, 16, 16, 32),
}

def _replace(**fields):
  return lambda x: x._replace(**{name: fn(getattr(x, name)) for name, fn in fields.items()})


_SAME = _replace()
BAD_CALLS = {  # name: (inputs -> bad inputs, extra kwargs, error pattern after "<op>: ")
    "q_k_mismatch": (_replace(k=lambda k: k[..., :-1]), {}, "q and k must have the same shape"),
    "v_batch_mismatch": (_replace(v=lambda v: v[:1]), {}, "v must match q"),
    "wrong_rank": (_replace(q=lambda q: q[0]), {}, "q must have rank 4"),
    "int_g": (_replace(g=lambda g: jnp.ones(g.shape, jnp.int32)), {},
              r"g \(log-decay\) must be float32 or float64, got int32"),
    "float16_g": (_replace(g=lambda g: g.astype(jnp.float16)), {},
                  r"g \(log-decay\) must be float32 or float64, got float16"),
    "bfloat16_g": (_replace(g=lambda g: g.astype(jnp.bfloat16)), {},
                   r"g \(log-decay\) must be float32 or float64, got bfloat16"),
    "g_shape": (_replace(g=lambda g: g[..., :1]), {}, r"g must have shape \(2, 7, 2\)"),
    "chunk_0": (_SAME, {"chunk_size": 0}, r"chunk_size must be in \[1, 256\], got 0"),
    "chunk_-1": (_SAME, {"chunk_size": -1}, r"chunk_size must be in \[1, 256\], got -1"),
    "chunk_257": (_SAME, {"chunk_size": 257}, r"chunk_size must be in \[1, 256\], got 257"),
    "chunk_float": (_SAME, {"chunk_size": 8.0}, "chunk_size must be a Python int"),
    "chunk_bool": (_SAME, {"chunk_size": True}, "chunk_size must be a Python int"),
    "unknown_impl": (_SAME, {"impl": "fast"}, "impl must be None or one of"),
    "state_shape": (_SAME, {"initial_state": jnp.ones((2, 2, 3, 5), jnp.float64)},
                    r"initial_state must have shape \(2, 2, 3, 4\)"),
}


def _state(rng, case: Case, dtype=jnp.float64):
  b, _, h, dk, dv = case.shape
  return random_state(rng, b, h, dk, dv, dtype) if case.with_state else None


def _as(x, dtype):
  return None if x is None else x.astype(dtype)


class OpAcceptance:
  """Outputs, final states and gradients of every impl against the recurrent float64 oracle."""

  spec: OpSpec

  def numpy_reference(self, x: Inputs, initial_state):
    """Independent float64 numpy loop with the upstream semantics: returns (o, final state)."""
    raise NotImplementedError

  @pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
  @pytest.mark.parametrize("case", AGREE_CASES.values(), ids=AGREE_CASES.keys())
  def test_impls_agree(self, rng, case, dtype):
    x = self.spec.inputs(rng, *case.shape, dtype=dtype)
    s0 = _state(rng, case, dtype)
    ref = self.spec(x.astype(jnp.float64), initial_state=_as(s0, jnp.float64), scale=case.scale,
                    chunk_size=case.chunk_size, impl="recurrent")
    for impl in IMPLS:
      o, state = self.spec(x, initial_state=s0, scale=case.scale, chunk_size=case.chunk_size,
                           impl=impl)
      assert o.dtype == dtype and state.dtype == dtype, (impl, o.dtype, state.dtype)
      assert_trees_close((o, state), ref, RTOL[dtype], f"{impl} {case} seed={seed_of(rng)}")

  @pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
  def test_chunked_gradients_match_recurrent(self, rng, case):
    x = self.spec.inputs(rng, *case.shape)
    s0 = _state(rng, case)
    cotangent = (jnp.asarray(rng.standard_normal(x.v.shape), jnp.float64),
                 jnp.asarray(rng.standard_normal((case.b, case.h, case.dk, case.dv)), jnp.float64))

    @functools.partial(jax.jit, static_argnames="impl")
    def grads(args, initial_state, impl):
      run = functools.partial(self.spec.fn, chunk_size=case.chunk_size, impl=impl)
      _, vjp = jax.vjp(lambda a, s: run(*a, initial_state=s), args, initial_state)
      return jax.tree.leaves(vjp(cotangent))

    names = [n for n, a in zip(Inputs._fields, x) if a is not None]
    names += ["initial_state"] * case.with_state
    actual, expected = grads(x.args(), s0, "chunked"), grads(x.args(), s0, "recurrent")
    assert len(actual) == len(expected) == len(names)
    for name, grad, ref_grad in zip(names, actual, expected):
      assert_close(grad, ref_grad, 1e-9, f"d/d{name} {case} seed={seed_of(rng)}")

  def test_check_grads_chunked(self, rng):
    x = self.spec.inputs(rng, 1, 6, 1, 3, 2)
    s0 = random_state(rng, 1, 1, 3, 2)

    @jax.jit
    def run(*args):
      return self.spec.fn(*args[:-1], initial_state=args[-1], chunk_size=4)

    check_grads(run, (*x.args(), s0), order=1, modes=("rev",))

  @pytest.mark.parametrize("with_state", [False, True])
  def test_step_decode_matches_forward(self, rng, with_state):
    case = Case(2, 12, 2, 4, 3, 5, with_state)
    x, s0 = self.spec.inputs(rng, *case.shape), _state(rng, case)
    o_full, state_full = self.spec(x, initial_state=s0, chunk_size=case.chunk_size)
    state, outs = s0, []
    for t in range(case.t):
      o_t, state = self.spec.step(x.map(lambda a: a[:, t]), state)
      outs.append(o_t)
    msg = f"seed={seed_of(rng)}"
    assert_close(jnp.stack(outs, axis=1), o_full, 1e-10, msg)
    assert_close(state, state_full, 1e-10, msg)

  def test_streaming_equals_one_call(self, rng, split=13):
    case = Case(2, 37, 2, 5, 4, 8)
    x, s0 = self.spec.inputs(rng, *case.shape), _state(rng, case)
    o_full, state_full = self.spec(x, initial_state=s0, chunk_size=case.chunk_size)
    o1, s1 = self.spec(x.map(lambda a: a[:, :split]), initial_state=s0, chunk_size=case.chunk_size)
    o2, s2 = self.spec(x.map(lambda a: a[:, split:]), initial_state=s1, chunk_size=case.chunk_size)
    msg = f"split={split} seed={seed_of(rng)}"
    assert_close(jnp.concatenate([o1, o2], axis=1), o_full, 1e-10, msg)
    assert_close(s2, state_full, 1e-10, msg)

  # One test body shared by the op subclasses (each its own `self`); sharing its example database
  # between ops is harmless.
  @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
  @given(b=st.integers(1, 2), t=st.integers(1, 24), h=st.integers(1, 2), dk=st.integers(1, 6),
         dv=st.integers(1, 6), chunk_size=st.integers(1, 32), with_state=st.booleans(),
         seed=st.integers(0, 2**32 - 1))
  def test_property_chunked_equals_recurrent(self, b, t, h, dk, dv, chunk_size, with_state, seed):
    rng = np.random.default_rng(seed)
    case = Case(b, t, h, dk, dv, chunk_size, with_state)
    x, s0 = self.spec.inputs(rng, *case.shape), _state(rng, case)
    ref = self.spec(x, initial_state=s0, impl="recurrent")
    out = self.spec(x, initial_state=s0, chunk_size=chunk_size, impl="chunked")
    assert_trees_close(out, ref, 1e-10, f"{case} seed={seed}")

  @pytest.mark.parametrize("impl", IMPLS)
  def test_bf16_inputs(self, rng, impl):
    case = Case(2, 40, 2, 16, 16, 16)
    x = self.spec.inputs(rng, *case.shape, dtype=jnp.bfloat16)
    s0 = _state(rng, case, jnp.bfloat16)
    o, state = self.spec(x, initial_state=s0, chunk_size=case.chunk_size, impl=impl)
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32, (o.dtype, state.dtype)
    ref = self.spec(x.astype(jnp.float64), initial_state=s0.astype(jnp.float64), impl="recurrent")
    assert_trees_close((o, state), ref, 1e-2, f"{impl} seed={seed_of(rng)}")

  @pytest.mark.parametrize("name", BAD_CALLS.keys())
  def test_bad_inputs_raise(self, rng, name):
    corrupt, kwargs, pattern = BAD_CALLS[name]
    x = corrupt(self.spec.inputs(rng, 2, 7, 2, 3, 4))
    with pytest.raises(ValueError, match=f"{self.spec.name}: {pattern}"):
      self.spec(x, **kwargs)

  def test_bad_step_input_raises(self, rng):
    x = self.spec.inputs(rng, 2, 7, 2, 3, 4)
    with pytest.raises(ValueError, match=rf"{self.spec.name}_step: q must have rank 3 \[B, H, D\]"):
      self.spec.step(x, None)

  def test_jit_equals_eager(self, rng):
    """Every other test runs jitted; eager dispatch (slow to compile) is checked here."""
    case = Case(2, 21, 2, 4, 5, 8)
    x, s0 = self.spec.inputs(rng, *case.shape), _state(rng, case)
    jitted = jax.jit(self.spec.fn, static_argnames=("chunk_size", "impl"))
    for impl in ("chunked", "recurrent"):
      expected = self.spec.fn(*x.args(), initial_state=s0, chunk_size=case.chunk_size, impl=impl)
      actual = jitted(*x.args(), initial_state=s0, chunk_size=case.chunk_size, impl=impl)
      assert_trees_close(actual, expected, 1e-12, f"{impl} seed={seed_of(rng)}")

  @pytest.mark.parametrize("with_state", [False, True])
  def test_matches_numpy_reference(self, rng, with_state):
    case = Case(2, 19, 2, 5, 3, 8, with_state)
    x, s0 = self.spec.inputs(rng, *case.shape), _state(rng, case)
    expected = self.numpy_reference(x.map(np.asarray), None if s0 is None else np.asarray(s0))
    actual = self.spec(x, initial_state=s0)                         # default scale and impl
    assert_trees_close(actual, expected, 1e-12, f"seed={seed_of(rng)}")

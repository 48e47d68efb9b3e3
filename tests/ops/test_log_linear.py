"""Tests of `dlax.ops.log_linear_attention` (Log-Linear Attention, spec dla.md §3)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import assert_close, jit_op, random_inputs, seed_of
from dlax.ops import LogLinearState, gated_delta, log_linear_attention, log_linear_step, ssd
from dlax.ops.log_linear import fenwick_levels

BACKBONES = {"mamba2": False, "gdn": True}
RTOL = 1e-10


class LLInputs(NamedTuple):
  """q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g `[B, T, H]`, lam `[B, T, H, L]`, beta or None."""
  q: jax.Array
  k: jax.Array
  v: jax.Array
  g: jax.Array
  lam: jax.Array
  beta: jax.Array | None

  def slice(self, start: int, stop: int) -> LLInputs:
    return LLInputs(*(None if x is None else x[:, start:stop] for x in self))

  def token(self, i: int) -> LLInputs:
    return LLInputs(*(None if x is None else x[:, i] for x in self))


def make_inputs(rng, b, t, h, dk, dv, num_weights, *, with_beta, dtype=jnp.float64) -> LLInputs:
  """Random backbone inputs (see `_helpers.random_inputs`) and positive λ in [0.1, 2)."""
  q, k, v, g, beta = random_inputs(rng, b, t, h, dk, dv, with_beta=with_beta, dtype=dtype)
  lam = jnp.asarray(rng.uniform(0.1, 2.0, (b, t, h, num_weights)), dtype)
  return LLInputs(q, k, v, g, lam, beta)


def random_state(rng, b, h, dk, dv, pos, dtype=jnp.float64) -> LogLinearState:
  """Every level random (any content is a valid state for the equivalence of the impls)."""
  return LogLinearState(jnp.asarray(rng.standard_normal((b, h, 32, dk, dv)), dtype),
                        jnp.asarray(pos, jnp.int32))


def run(x: LLInputs, **kwargs):
  return jit_op(log_linear_attention)(*x, **kwargs)


def step(x_t: LLInputs, state, **kwargs):
  return jit_op(log_linear_step)(*x_t[:5], state, x_t.beta, **kwargs)


def assert_same(actual, expected, rtol: float, msg: str):
  """(o, LogLinearState) pairs agree: outputs, level states and positions."""
  (o, state), (o_ref, state_ref) = actual, expected
  assert_close(o, o_ref, rtol, f"o, {msg}")
  assert_close(state.S, state_ref.S, rtol, f"S, {msg}")
  np.testing.assert_array_equal(state.pos, state_ref.pos, err_msg=f"pos, {msg}")


def brute_force_level(t: int, s: int) -> int:
  return 0 if s == t else 1 + math.floor(math.log2(t ^ s))


# ---------------------------------------------------------------------------------------------
# 1. Level map


def test_fenwick_levels_match_brute_force(rng):
  grid = np.arange(70)
  expected = [[brute_force_level(t, s) for s in grid] for t in grid]
  np.testing.assert_array_equal(fenwick_levels(grid, grid), expected)
  t = rng.integers(1, 2 ** 31, 500).astype(np.int32)                 # absolute positions < 2^31
  s = (t * rng.uniform(0.0, 1.0, 500)).astype(np.int32)              # s ≤ t
  np.testing.assert_array_equal(np.diagonal(fenwick_levels(t, s)),
                                [brute_force_level(int(a), int(b)) for a, b in zip(t, s)],
                                err_msg=f"seed={seed_of(rng)}")


def test_16k_tokens_use_15_levels():
  t = np.arange(16384, dtype=np.int32)
  s = t[::16]
  levels = np.asarray(fenwick_levels(t, s))[s[None, :] <= t[:, None]]
  assert np.unique(levels).tolist() == list(range(15))


# ---------------------------------------------------------------------------------------------
# 2–3. The three implementations agree


@pytest.mark.parametrize("backbone", BACKBONES)
def test_recurrent_matches_masked(rng, backbone):
  """The Fenwick cascade reproduces the masked form with rank_t(s) := ℓ(t, s), λ clamped."""
  x = make_inputs(rng, 2, 70, 2, 4, 3, 5, with_beta=BACKBONES[backbone])
  assert_same(run(x, scale=0.7, impl="recurrent"), run(x, scale=0.7, impl="masked"), RTOL,
              f"seed={seed_of(rng)}")


@pytest.mark.parametrize("with_state", [False, True], ids=["from_zero", "mixed_pos_state"])
@pytest.mark.parametrize("chunk_size", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_chunked_matches_recurrent(rng, backbone, chunk_size, with_state):
  """T not a multiple of C; the state rows start misaligned (2^20 + 37) and aligned (3·64)."""
  t = 157 if with_state else 299
  x = make_inputs(rng, 2, t, 2, 4, 3, 6, with_beta=BACKBONES[backbone])
  state = random_state(rng, 2, 2, 4, 3, [2 ** 20 + 37, 3 * 64]) if with_state else None
  kwargs = dict(scale=0.8, initial_state=state)
  assert_same(run(x, impl="chunked", chunk_size=chunk_size, **kwargs),
              run(x, impl="recurrent", **kwargs), RTOL, f"seed={seed_of(rng)}")


# ---------------------------------------------------------------------------------------------
# 4. λ ≡ 1 is the base model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_unit_lambda_is_base_model(rng, backbone):
  """λ ≡ 1: the level outputs sum to the base op's, and the levels sum to its state."""
  b, t, h, dk, dv = 2, 45, 2, 4, 3
  x = make_inputs(rng, b, t, h, dk, dv, 3, with_beta=BACKBONES[backbone])
  x = x._replace(lam=jnp.ones_like(x.lam))
  state = random_state(rng, b, h, dk, dv, [21, 100])
  o, final = run(x, scale=0.9, chunk_size=8, initial_state=state)
  base_args = (x.q, x.k, x.v, x.g) + (() if x.beta is None else (x.beta,))
  base = jit_op(gated_delta if BACKBONES[backbone] else ssd)
  o_base, s_base = base(*base_args, scale=0.9, initial_state=state.S.sum(2), impl="recurrent")
  msg = f"seed={seed_of(rng)}"
  assert_close(o, o_base, RTOL, f"o, {msg}")
  assert_close(final.S.sum(2), s_base, RTOL, f"Σ_ℓ S, {msg}")


# ---------------------------------------------------------------------------------------------
# 5. Gradients


def _loss(impl, x, s0, pos, weights):
  o, final = log_linear_attention(*x, scale=0.8, chunk_size=8, impl=impl,
                                  initial_state=LogLinearState(s0, pos))
  return jnp.sum(o * weights[0]) + jnp.sum(final.S * weights[1])


_grad = jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_chunked_gradients_match_recurrent(rng, backbone):
  """d/d(q, k, v, g, β, λ, S0) of a loss on o and the final state, misaligned start."""
  b, t, h, dk, dv = 2, 37, 2, 4, 3
  x = make_inputs(rng, b, t, h, dk, dv, 5, with_beta=BACKBONES[backbone])
  state = random_state(rng, b, h, dk, dv, [13, 40])
  weights = (jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float64),
             jnp.asarray(rng.standard_normal(state.S.shape), jnp.float64))
  args = (x, state.S, state.pos, weights)
  grads, grads_ref = _grad("chunked", *args), _grad("recurrent", *args)
  names = [f"d{n}" for n in LLInputs._fields if getattr(x, n) is not None] + ["dS0"]
  for name, actual, expected in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref),
                                    strict=True):
    assert_close(actual, expected, 1e-8, f"{name}, seed={seed_of(rng)}")


# ---------------------------------------------------------------------------------------------
# 6. Decode step and streaming


@pytest.mark.parametrize("backbone", BACKBONES)
def test_step_loop_matches_forward(rng, backbone):
  """Row 0 (pos 9, C = 16) ends before its first chunk boundary; row 1 starts aligned (pos 64)."""
  b, t, h, dk, dv = 2, 6, 2, 3, 4
  x = make_inputs(rng, b, t, h, dk, dv, 4, with_beta=BACKBONES[backbone])
  state0 = random_state(rng, b, h, dk, dv, [9, 64])
  state, outs = state0, []
  for i in range(t):
    o_i, state = step(x.token(i), state, scale=0.6)
    outs.append(o_i)
  expected = run(x, scale=0.6, chunk_size=16, initial_state=state0)
  assert_same((jnp.stack(outs, axis=1), state), expected, RTOL, f"seed={seed_of(rng)}")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_streaming_matches_one_call(rng, backbone):
  """Two calls of 24 tokens (the first from an explicit empty state, pos 0) equal one of 48."""
  b, h, dk, dv = 2, 2, 4, 3
  x = make_inputs(rng, b, 48, h, dk, dv, 6, with_beta=BACKBONES[backbone])
  empty = LogLinearState.empty(b, h, dk, dv, dtype=jnp.float64)
  o_first, state = run(x.slice(0, 24), chunk_size=16, initial_state=empty)
  o_second, state = run(x.slice(24, 48), chunk_size=16, initial_state=state)
  assert_same((jnp.concatenate([o_first, o_second], axis=1), state), run(x, chunk_size=16),
              RTOL, f"seed={seed_of(rng)}")


def test_float32_dtypes(rng):
  x = make_inputs(rng, 1, 20, 2, 4, 4, 3, with_beta=True, dtype=jnp.float32)
  o, state = run(x, chunk_size=4)
  assert o.dtype == jnp.float32 and state.S.dtype == jnp.float32 and state.pos.dtype == jnp.int32
  assert state.S.shape == (1, 2, 32, 4, 4)
  assert_close(o, run(x, impl="recurrent")[0], 1e-5, f"seed={seed_of(rng)}")


# ---------------------------------------------------------------------------------------------
# 7. Bad inputs


def _with_state(impl: str = "chunked", **fields):
  """Inputs -> (inputs, kwargs) with an empty `[2, 2, 32, 3, 4]` state, `fields` replaced."""
  state = LogLinearState.empty(2, 2, 3, 4, dtype=jnp.float64)._replace(**fields)
  return lambda x: (x, {"initial_state": state, "impl": impl})


def _with(**fields):
  """Inputs -> (inputs with `fields` mapped, no kwargs)."""
  return lambda x: (x._replace(**{n: fn(getattr(x, n)) for n, fn in fields.items()}), {})


BAD_CALLS = {  # name: (inputs -> (inputs, kwargs), error pattern after "log_linear_attention: ")
    "chunk_not_power_of_two": (lambda x: (x, {"chunk_size": 48}),
                               "chunk_size must be a power of two"),
    "chunk_out_of_range": (lambda x: (x, {"chunk_size": 512}), r"chunk_size must be in \[1, 256\]"),
    "lam_wrong_shape": (_with(lam=lambda a: a[:, :-1]), r"lam must have shape \(2, 7, 2, 'L'\)"),
    "lam_no_level_axis": (_with(lam=lambda a: a[..., 0]), "lam must have shape"),
    "lam_empty": (_with(lam=lambda a: a[..., :0]), r"lam must have shape .*L >= 1"),
    "lam_int": (_with(lam=lambda a: jnp.ones(a.shape, jnp.int32)), "lam must be floating point"),
    "bad_beta": (_with(beta=lambda a: a[..., :1]), "beta must have shape"),
    "masked_with_state": (_with_state(impl="masked"),
                          'impl="masked" starts at position 0 .* use impl="chunked"'),
    "state_not_namedtuple": (lambda x: (x, {"initial_state": jnp.zeros((2, 2, 3, 4), jnp.float64)}),
                             "the state must be a LogLinearState"),
    "state_shape": (_with_state(S=jnp.zeros((2, 2, 32, 4, 3), jnp.float64)),
                    r"state.S must have shape \(2, 2, 'levels', 3, 4\)"),
    "state_pos_shape": (_with_state(pos=jnp.zeros((3,), jnp.int32)),
                        r"state.pos must be an integer array of shape \(2,\)"),
    "pos_overflow": (_with_state(pos=jnp.array([0, 2 ** 31 - 5], jnp.int32)),
                     r"pos \+ T = 2147483650 exceeds"),
    "too_few_levels": (_with_state(S=jnp.zeros((2, 2, 3, 3, 4), jnp.float64),
                                   pos=jnp.array([0, 1], jnp.int32)),
                       r"pos \+ T = 8 exceeds the 4 positions that 3 levels support"),
}


@pytest.mark.parametrize("name", BAD_CALLS)
def test_bad_inputs_raise(rng, name):
  make_bad, pattern = BAD_CALLS[name]
  x, kwargs = make_bad(make_inputs(rng, 2, 7, 2, 3, 4, 3, with_beta=True))
  with pytest.raises(ValueError, match=f"log_linear_attention: {pattern}"):
    log_linear_attention(*x, **kwargs)


def test_bad_step_inputs_raise(rng):
  x = make_inputs(rng, 2, 1, 2, 3, 4, 3, with_beta=False).token(0)
  state = LogLinearState.empty(2, 2, 3, 4, dtype=jnp.float64)
  with pytest.raises(ValueError, match=r"log_linear_step: lam must have shape \(2, 2, 'L'\)"):
    log_linear_step(x.q, x.k, x.v, x.g, x.lam[:, :1], state)
  with pytest.raises(ValueError, match="log_linear_step: q must have rank 3"):
    log_linear_step(x.q[:, None], x.k, x.v, x.g, x.lam, state)

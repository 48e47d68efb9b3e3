"""Shared test helpers for the linear-attention ops: random inputs, op adapters, assertions."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-5}


class Inputs(NamedTuple):
  """Op inputs: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]` (beta None for ssd)."""
  q: np.ndarray
  k: np.ndarray
  v: np.ndarray
  g: np.ndarray
  beta: np.ndarray | None = None

  def args(self) -> tuple:
    return tuple(x for x in self if x is not None)

  def map(self, fn) -> Inputs:
    return Inputs(*(None if x is None else fn(x) for x in self))

  def astype(self, dtype) -> Inputs:
    """q, k, v, beta in `dtype`; g in float64 for float64, else float32 (decays stay in fp32)."""
    g_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    cast = Inputs(*(jnp.asarray(x, dtype) if x is not None else None for x in self))
    return cast._replace(g=jnp.asarray(self.g, g_dtype))


def random_inputs(rng, b, t, h, dk, dv, *, with_beta: bool, dtype=jnp.float64) -> Inputs:
  """Normal q, k, v; log-decays g = −softplus(z)/2; beta = sigmoid(z). With beta (the delta
  rule), k is L2-normalised per head so the recurrence is stable."""
  q = rng.standard_normal((b, t, h, dk))
  k = rng.standard_normal((b, t, h, dk))
  if with_beta:
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.standard_normal((b, t, h, dv))
  g = -0.5 * np.logaddexp(0.0, rng.standard_normal((b, t, h)))
  beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h)))) if with_beta else None
  return Inputs(q, k, v, g, beta).astype(dtype)


def random_state(rng, b, h, dk, dv, dtype=jnp.float64):
  return jnp.asarray(rng.standard_normal((b, h, dk, dv)), dtype)


@functools.cache
def jit_op(fn: Callable) -> Callable:
  """`jax.jit(fn)` with its Python options static: one compile per shape, not one per primitive."""
  options = ("scale", "chunk_size", "impl")
  return jax.jit(fn, static_argnames=[n for n in options if n in inspect.signature(fn).parameters])


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """Uniform adapter over an op `fn(q, k, v, g, [beta], **kw)` and its decode step; calls are
  jitted (eager dispatch compiles every primitive separately, which is several times slower)."""
  name: str
  fn: Callable
  step_fn: Callable
  has_beta: bool

  def __call__(self, x: Inputs, **kwargs):
    return jit_op(self.fn)(*x.args(), **kwargs)

  def step(self, x_t: Inputs, state, **kwargs):
    return jit_op(self.step_fn)(*x_t.args(), state, **kwargs)

  def inputs(self, rng, b, t, h, dk, dv, dtype=jnp.float64) -> Inputs:
    return random_inputs(rng, b, t, h, dk, dv, with_beta=self.has_beta, dtype=dtype)


def seed_of(rng: np.random.Generator) -> int:
  return rng.bit_generator.seed_seq.entropy


def relative_error(actual, expected) -> float:
  actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def assert_close(actual, expected, rtol: float, msg: str = ""):
  """Asserts ‖actual − expected‖ / ‖expected‖ <= rtol (a zero reference is an error)."""
  assert np.shape(actual) == np.shape(expected), (
      f"{msg}: shape {np.shape(actual)} != {np.shape(expected)}")
  assert np.linalg.norm(np.asarray(expected, np.float64)) > 0, f"{msg}: reference is all zeros"
  err = relative_error(actual, expected)
  assert err <= rtol, f"{msg}: relative error {err:.3e} > {rtol:.1e}"


def assert_trees_close(actual, expected, rtol: float, msg: str = ""):
  """`assert_close` leaf by leaf over matching tuples (e.g. (o, final_state))."""
  assert len(actual) == len(expected), msg
  for i, (a, e) in enumerate(zip(actual, expected)):
    assert_close(a, e, rtol, f"{msg} [leaf {i}]")

"""Initialisers and parameter constructors shared by the mixers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dense(in_features: int, out_features: int, *, init_std: float, dtype, param_dtype,
          rngs: nnx.Rngs) -> nnx.Linear:
  """Bias-free linear layer with N(0, init_std²) weights."""
  return nnx.Linear(in_features, out_features, use_bias=False,
                    kernel_init=nnx.initializers.normal(init_std), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def inverse_softplus(y):
  """`softplus⁻¹(y) = y + log(−expm1(−y))` for y > 0."""
  return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(key, shape, dtype, *, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4):
  """Mamba-2's dt bias: `softplus⁻¹(dt)`, `dt = max(exp(U(log dt_min, log dt_max)), dt_floor)`."""
  u = jax.random.uniform(key, shape, dtype, minval=jnp.log(dt_min), maxval=jnp.log(dt_max))
  return inverse_softplus(jnp.maximum(jnp.exp(u), dt_floor))


def state_dtype(dtype) -> jnp.dtype:
  """Dtype of recurrent states and decay parameters: fp32, or fp64 for fp64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)

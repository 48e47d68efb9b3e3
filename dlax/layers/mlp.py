"""SwiGLU feed-forward block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dlax.layers.initializers import dense


class SwiGLU(nnx.Module):
  """`down(silu(gate(x)) ⊙ up(x))`, no biases; `[..., d_model] -> [..., d_model]`."""

  def __init__(self, d_model: int, d_ff: int, *, init_std: float = 0.02, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = dense(d_model, d_ff, **kw)
    self.up = dense(d_model, d_ff, **kw)
    self.down = dense(d_ff, d_model, **kw)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

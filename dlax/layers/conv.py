"""Causal depthwise 1-D convolution with a decode state (the short conv of Mamba-2 and GDN)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def causal_conv1d(x, weight, bias=None, state=None):
  """Depthwise causal conv: `y_t = bias + Σ_j weight[j] · x_{t−W+1+j}`.

  Args:
    x: `[B, T, C]`, T ≥ 1.
    weight: `[W, C]` (tap `W−1` multiplies the current token).
    bias: optional `[C]`.
    state: `[B, W−1, C]`, the previous W−1 inputs (oldest first); None means zeros (sequence start).

  Returns:
    (y `[B, T, C]` in x's dtype, new state `[B, W−1, C]`: the last W−1 inputs, in the dtype of
    `state` (x's dtype when None), so a cache keeps its dtype).
  """
  width = weight.shape[0]
  b, t, c = x.shape
  if state is None:
    state = jnp.zeros((b, width - 1, c), x.dtype)
  padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)       # [B, W−1+T, C]
  w = weight.astype(x.dtype)
  y = sum(padded[:, j:j + t] * w[j] for j in range(width))
  if bias is not None:
    y = y + bias.astype(x.dtype)
  return y, padded[:, t:].astype(state.dtype)


class CausalConv1d(nnx.Module):
  """Depthwise causal conv over `[B, T, C]` with PyTorch's default init, U(±1/√W)."""

  def __init__(self, channels: int, kernel_size: int = 4, *, use_bias: bool = True,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    bound = kernel_size ** -0.5
    init = nnx.initializers.uniform(scale=2 * bound)
    self.kernel_size = kernel_size
    self.weight = nnx.Param(init(rngs.params(), (kernel_size, channels), param_dtype) - bound)
    self.bias = (nnx.Param(init(rngs.params(), (channels,), param_dtype) - bound)
                 if use_bias else None)

  def __call__(self, x, state=None):
    """x `[B, T, C]`, state `[B, W−1, C]` or None -> (y `[B, T, C]`, new state `[B, W−1, C]`)."""
    bias = None if self.bias is None else self.bias[...]
    return causal_conv1d(x, self.weight[...], bias, state)

"""RMS normalisation: plain (`RMSNorm`) and gated Mamba-2 style (`GatedRMSNorm`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_norm(x, weight, *, eps: float):
  """`x · rsqrt(mean(x²) + eps) · weight` over the last axis, computed in at least fp32.

  Args:
    x: `[..., D]`. weight: `[D]`.

  Returns:
    `[..., D]` in x's dtype.
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  h = x.astype(acc)
  h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
  return h.astype(x.dtype) * weight.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis of `[..., dim]` inputs, with a learned scale (init 1)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    return rms_norm(x, self.weight[...], eps=self.eps)


class GatedRMSNorm(nnx.Module):
  """Mamba-2's gated norm: `RMSNorm(x ⊙ silu(z))` (gate applied before the norm).

  Statistics are taken over groups of `group_size` features (default: the full `dim`, i.e.
  Mamba-2 with one group); the scale is per feature.
  """

  def __init__(self, dim: int, *, group_size: int | None = None, eps: float = 1e-6,
               param_dtype=jnp.float32):
    group_size = dim if group_size is None else group_size
    if dim % group_size:
      raise ValueError(f"GatedRMSNorm: dim {dim} is not divisible by group_size {group_size}")
    self.group_size = group_size
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x, z):
    """x, z: `[..., dim]`. Returns `[..., dim]` in x's dtype."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    h = x.astype(acc) * jax.nn.silu(z.astype(acc))
    groups = h.reshape(*h.shape[:-1], -1, self.group_size)
    ones = jnp.ones((self.group_size,), acc)
    h = rms_norm(groups, ones, eps=self.eps).reshape(h.shape)
    return h.astype(x.dtype) * self.weight[...].astype(x.dtype)

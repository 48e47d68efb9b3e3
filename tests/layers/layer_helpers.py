"""Shared pieces of the layer tests: small mixers, float64 numpy primitives, error measures."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.layers import Attention, GatedDeltaNet, Mamba2Mixer

D_MODEL = 32
MIXER_NAMES = ("mamba2", "gated_delta", "attention")


def make_mixer(name: str, rng: np.random.Generator, *, dtype=jnp.float32, chunk_size: int = 8,
               impl: str = "chunked", cls=None, **overrides):
  """A small mixer with random weights (init_std 0.1 so every path carries signal); `cls`
  overrides the class built (e.g. `DLAMamba2` for name "mamba2")."""
  rngs = nnx.Rngs(int(rng.integers(1 << 30)))
  common = dict(init_std=0.1, dtype=dtype, param_dtype=dtype, rngs=rngs, **overrides)
  if name == "mamba2":
    return (cls or Mamba2Mixer)(D_MODEL, headdim=8, d_state=8, expand=2, chunk_size=chunk_size,
                                impl=impl, **common)
  if name == "gated_delta":
    return (cls or GatedDeltaNet)(D_MODEL, num_heads=2, head_dim_k=8, head_dim_v=12,
                                  chunk_size=chunk_size, impl=impl, **common)
  return (cls or Attention)(D_MODEL, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                            **common)


def rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def params(module) -> dict:
  """Flat {path: float64 numpy array} view of a module's parameters."""
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  return {".".join(map(str, path)): np.asarray(v[...], np.float64) for path, v in flat}


def silu(x):
  return x / (1 + np.exp(-x))


def softplus(x):
  return np.logaddexp(0.0, x)


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def rms_norm(x, weight, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


class StreamingConv:
  """Token-by-token causal depthwise conv over a history buffer (weight `[W, C]`)."""

  def __init__(self, weight, bias=None):
    self.weight, self.bias = weight, 0.0 if bias is None else bias
    self.history = np.zeros_like(weight)

  def __call__(self, x_t):                       # [C] -> [C]
    self.history = np.concatenate([self.history[1:], x_t[None]], axis=0)
    return np.sum(self.history * self.weight, axis=0) + self.bias


def jax_rng_key(rng):
  return jax.random.key(int(rng.integers(1 << 30)))

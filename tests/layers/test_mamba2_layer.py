"""Mamba-2 mixer: wiring against an independent float64 token-by-token numpy model, and init."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.layers import Mamba2Mixer
from layer_helpers import (D_MODEL, StreamingConv, make_mixer, params, rel_err, rms_norm, silu,
                           softplus)


def mamba2_reference(p, x, *, headdim, d_state):
  """x `[B, T, d]` float64 -> `[B, T, d]`, one token at a time with an explicit state."""
  d_inner = p["out_proj.kernel"].shape[0]
  heads, n = d_inner // headdim, d_state
  a = -np.exp(p["A_log"])
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    conv = StreamingConv(p["conv.weight"], p["conv.bias"])
    state = np.zeros((heads, n, headdim))
    for t in range(x.shape[1]):
      proj = x[b, t] @ p["in_proj.kernel"]
      z, xbc, dt = proj[:d_inner], proj[d_inner:2 * d_inner + 2 * n], proj[2 * d_inner + 2 * n:]
      xbc = silu(conv(xbc))
      xs = xbc[:d_inner].reshape(heads, headdim)
      b_t, c_t = xbc[d_inner:d_inner + n], xbc[d_inner + n:]
      delta = softplus(dt + p["dt_bias"])                                   # [H]
      state = (np.exp(delta * a)[:, None, None] * state
               + b_t[None, :, None] * (delta[:, None] * xs)[:, None, :])
      y = np.einsum("hnp,n->hp", state, c_t) + p["D"][:, None] * xs
      y = rms_norm(y.reshape(d_inner) * silu(z), p["norm.weight"])
      out[b, t] = y @ p["out_proj.kernel"]
  return out


def test_matches_float64_token_by_token_reference(rng):
  mixer = make_mixer("mamba2", rng, dtype=jnp.float64)
  p = params(mixer)
  p["D"] = rng.normal(size=p["D"].shape)                 # a non-trivial skip
  mixer.D[...] = jnp.asarray(p["D"], jnp.float64)
  x = rng.normal(size=(2, 13, D_MODEL))
  y, _ = mixer(jnp.asarray(x, jnp.float64))
  assert rel_err(y, mamba2_reference(p, x, headdim=8, d_state=8)) <= 1e-10


def test_init():
  mixer = Mamba2Mixer(64, headdim=2, d_state=4, expand=2, rngs=nnx.Rngs(0))
  heads = mixer.num_heads
  assert heads == 64
  np.testing.assert_allclose(mixer.A_log[...], np.log(np.arange(1, heads + 1)), rtol=1e-6)
  np.testing.assert_array_equal(mixer.D[...], 1.0)
  dt = softplus(np.asarray(mixer.dt_bias[...], np.float64))
  assert np.all(dt >= 1e-3 * (1 - 1e-5)) and np.all(dt <= 0.1 * (1 + 1e-5))
  assert dt.min() < 3e-3 and dt.max() > 3e-2                 # spread log-uniformly
  for param in (mixer.A_log, mixer.D, mixer.dt_bias):
    assert param.dtype == jnp.float32
  kernel = np.asarray(mixer.in_proj.kernel[...])
  assert kernel.shape == (64, 2 * 128 + 2 * 4 + heads)
  assert abs(kernel.std() - 0.02) < 0.002


def test_rejects_indivisible_headdim():
  with pytest.raises(ValueError, match="headdim"):
    Mamba2Mixer(10, headdim=8, expand=2, rngs=nnx.Rngs(0))

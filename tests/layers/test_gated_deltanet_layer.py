"""Gated DeltaNet mixer: wiring against an independent float64 numpy model, and init."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.layers import GatedDeltaNet
from layer_helpers import (D_MODEL, StreamingConv, make_mixer, params, rel_err, rms_norm,
                           sigmoid, silu, softplus)


def _l2_normalize(x):
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def gated_deltanet_reference(p, x, *, heads, dk, dv):
  """x `[B, T, d]` float64 -> `[B, T, d]`: S ← exp(g)S; u = β(v − Sᵀk); S ← S + kuᵀ; o = Sᵀq/√Dk."""
  out = np.zeros_like(x)
  for b in range(x.shape[0]):
    convs = {n: StreamingConv(p[f"{n}_conv.weight"]) for n in "qkv"}
    state = np.zeros((heads, dk, dv))
    for t in range(x.shape[1]):
      xt = x[b, t]
      q, k, v = (silu(convs[n](xt @ p[f"{n}_proj.kernel"])) for n in "qkv")
      q, k = _l2_normalize(q.reshape(heads, dk)), _l2_normalize(k.reshape(heads, dk))
      v = v.reshape(heads, dv)
      beta = sigmoid(xt @ p["b_proj.kernel"])
      g = -np.exp(p["A_log"]) * softplus(xt @ p["a_proj.kernel"] + p["dt_bias"])
      state = np.exp(g)[:, None, None] * state
      u = beta[:, None] * (v - np.einsum("hkv,hk->hv", state, k))
      state = state + k[:, :, None] * u[:, None, :]
      o = np.einsum("hkv,hk->hv", state, q * dk ** -0.5)
      o = rms_norm(o, p["o_norm.weight"]) * silu((xt @ p["g_proj.kernel"]).reshape(heads, dv))
      out[b, t] = o.reshape(-1) @ p["o_proj.kernel"]
  return out


def test_matches_float64_token_by_token_reference(rng):
  mixer = make_mixer("gated_delta", rng, dtype=jnp.float64)
  x = rng.normal(size=(2, 13, D_MODEL))
  y, _ = mixer(jnp.asarray(x, jnp.float64))
  ref = gated_deltanet_reference(params(mixer), x, heads=2, dk=8, dv=12)
  assert rel_err(y, ref) <= 1e-10


def test_init():
  mixer = GatedDeltaNet(32, num_heads=256, head_dim_k=2, head_dim_v=2, rngs=nnx.Rngs(0))
  a = np.exp(np.asarray(mixer.A_log[...], np.float64))
  assert np.all(a >= 1 - 1e-5) and np.all(a <= 16 * (1 + 1e-5))
  assert a.min() < 2 and a.max() > 15                              # uniform over [1, 16]
  dt = softplus(np.asarray(mixer.dt_bias[...], np.float64))
  assert np.all(dt >= 1e-3 * (1 - 1e-5)) and np.all(dt <= 0.1 * (1 + 1e-5))
  assert mixer.A_log.dtype == mixer.dt_bias.dtype == jnp.float32
  assert mixer.q_conv.bias is None and mixer.v_conv.bias is None

"""Tests of `dlax.ops.gated_delta` (Gated DeltaNet / gated delta rule)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from _acceptance import OpAcceptance
from _helpers import OpSpec, assert_close, seed_of
from dlax.ops import gated_delta, gated_delta_step
from dlax.ops.gated_delta import gated_delta_attention_matrix


def recurrent_gated_delta_rule_ref(q, k, v, beta, g, scale=None, initial_state=None):
  """float64 numpy mirror of fla's `gated_delta_rule/naive.py` (note fla's (beta, g) order)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  state = np.zeros((b, h, dk, dv)) if initial_state is None else initial_state.copy()
  o = np.zeros((b, t, h, dv))
  for i in range(t):
    b_q, b_k, b_v = q[:, i], k[:, i], v[:, i]
    state = state * np.exp(g[:, i])[:, :, None, None]
    delta = beta[:, i, :, None] * (b_v - (state * b_k[..., None]).sum(-2))
    state = state + b_k[..., None] * delta[..., None, :]
    o[:, i] = np.einsum("bhk,bhkv->bhv", b_q * scale, state)
  return o, state


class TestGatedDelta(OpAcceptance):
  spec = OpSpec("gated_delta", gated_delta, gated_delta_step, has_beta=True)

  def numpy_reference(self, x, initial_state):
    return recurrent_gated_delta_rule_ref(x.q, x.k, x.v, x.beta, x.g, initial_state=initial_state)

  @pytest.mark.parametrize("beta_shape", [(2, 7, 1), (2, 7, 2, 1)])
  def test_bad_beta_shape_raises(self, rng, beta_shape):
    x = self.spec.inputs(rng, 2, 7, 2, 3, 4)
    x = x._replace(beta=jnp.ones(beta_shape, jnp.float32))
    with pytest.raises(ValueError, match=r"gated_delta: beta must have shape \(2, 7, 2\)"):
      self.spec(x)

  def test_integer_beta_raises(self, rng):
    x = self.spec.inputs(rng, 2, 7, 2, 3, 4)
    x = x._replace(beta=jnp.ones((2, 7, 2), jnp.int32))
    with pytest.raises(ValueError, match="gated_delta: beta must be floating point"):
      self.spec(x)

  def test_missing_beta_raises(self, rng):
    x = self.spec.inputs(rng, 2, 7, 2, 3, 4)
    with pytest.raises(ValueError, match="gated_delta: beta .* is required"):
      gated_delta(x.q, x.k, x.v, x.g, None)
    with pytest.raises(ValueError, match="gated_delta_step: beta .* is required"):
      gated_delta_step(x.q[:, 0], x.k[:, 0], x.v[:, 0], x.g[:, 0], None)

  def test_attention_matrix_is_transported_keys(self, rng):
    """`A[t,s] = scale β_s q_tᵀ Φ_{s→t} k_s` with Φ the product of the per-token transitions
    `α_r (I − β_r k_r k_rᵀ)`, built explicitly in numpy."""
    b, t, h, dk, dv = 1, 9, 2, 4, 3
    x = self.spec.inputs(rng, b, t, h, dk, dv)
    q, k, g, beta = (np.asarray(a) for a in (x.q, x.k, x.g, x.beta))
    scale = 0.8
    expected = np.zeros((b, h, t, t))
    for bi in range(b):
      for hi in range(h):
        for s in range(t):
          transported = k[bi, s, hi]                               # Φ_{s→s} k_s
          for tt in range(s, t):
            if tt > s:
              kr = k[bi, tt, hi]
              transported = np.exp(g[bi, tt, hi]) * (
                  transported - beta[bi, tt, hi] * kr * (kr @ transported))
            expected[bi, hi, tt, s] = scale * beta[bi, s, hi] * q[bi, tt, hi] @ transported
    actual = gated_delta_attention_matrix(x.q, x.k, x.g, x.beta, scale=scale)
    assert_close(actual, expected, 1e-12, f"seed={seed_of(rng)}")
    o, _ = self.spec(x, scale=scale, impl="masked")
    assert_close(o, np.einsum("bhts,bshv->bthv", expected, np.asarray(x.v)), 1e-12,
                 f"o = A V, seed={seed_of(rng)}")

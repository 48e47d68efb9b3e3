"""Causal depthwise conv: numpy reference, state continuation, init range."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.layers import CausalConv1d, causal_conv1d


def _np_causal_conv(x, weight, bias):
  width = weight.shape[0]
  padded = np.concatenate([np.zeros((x.shape[0], width - 1, x.shape[2])), x], axis=1)
  y = sum(padded[:, j:j + x.shape[1]] * weight[j] for j in range(width))
  return y + bias


def test_matches_numpy(rng):
  x, weight, bias = rng.normal(size=(2, 9, 5)), rng.normal(size=(4, 5)), rng.normal(size=(5,))
  y, state = causal_conv1d(*(jnp.asarray(a, jnp.float64) for a in (x, weight, bias)))
  np.testing.assert_allclose(y, _np_causal_conv(x, weight, bias), rtol=1e-12)
  np.testing.assert_array_equal(state, x[:, -3:])


@pytest.mark.parametrize("splits", [(5, 7), (1, 11), (2, 1, 1, 8), (12,)])
def test_state_continuation(rng, splits):
  conv = CausalConv1d(6, 4, use_bias=True, param_dtype=jnp.float64,
                      rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = jnp.asarray(rng.normal(size=(2, sum(splits), 6)), jnp.float64)
  full, full_state = conv(x)
  pieces, state, start = [], None, 0
  for length in splits:
    y, state = conv(x[:, start:start + length], state)
    pieces.append(y)
    start += length
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(state, full_state)


def test_short_sequence_state_keeps_older_inputs(rng):
  x = jnp.asarray(rng.normal(size=(1, 5, 3)), jnp.float64)
  weight = jnp.asarray(rng.normal(size=(4, 3)), jnp.float64)
  _, state = causal_conv1d(x[:, :2], weight)
  np.testing.assert_array_equal(state[:, 0], 0.0)              # still the zero padding
  np.testing.assert_array_equal(state[:, 1:], x[:, :2])


def test_init_is_bounded_and_bias_optional(rng):
  conv = CausalConv1d(64, 4, use_bias=False, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  assert conv.bias is None
  weight = np.asarray(conv.weight[...])
  assert weight.shape == (4, 64) and weight.dtype == np.float32
  assert np.all(np.abs(weight) <= 0.5) and weight.std() > 0.1

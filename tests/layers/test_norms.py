"""RMSNorm and GatedRMSNorm against float64 numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from dlax.layers import GatedRMSNorm, RMSNorm


def _np_rms_norm(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _np_silu(x):
  return x / (1 + np.exp(-x))


def test_rms_norm_matches_formula(rng):
  x = rng.normal(size=(2, 5, 12)) * 3
  weight = rng.normal(size=(12,))
  norm = RMSNorm(12, eps=1e-5, param_dtype=jnp.float64)
  norm.weight[...] = jnp.asarray(weight, jnp.float64)
  out = norm(jnp.asarray(x, jnp.float64))
  np.testing.assert_allclose(out, _np_rms_norm(x, 1e-5) * weight, rtol=1e-12)


def test_rms_norm_keeps_low_precision_dtype(rng):
  x = jnp.asarray(rng.normal(size=(3, 16)), jnp.bfloat16)
  out = RMSNorm(16)(x)
  assert out.dtype == jnp.bfloat16
  ref = _np_rms_norm(np.asarray(x, np.float64), 1e-6)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_rms_norm_gates_before_normalising(rng, group_size):
  x, z = rng.normal(size=(2, 3, 12)), rng.normal(size=(2, 3, 12))
  weight = rng.normal(size=(12,))
  norm = GatedRMSNorm(12, group_size=group_size, eps=1e-6, param_dtype=jnp.float64)
  norm.weight[...] = jnp.asarray(weight, jnp.float64)
  out = norm(jnp.asarray(x, jnp.float64), jnp.asarray(z, jnp.float64))
  h = (x * _np_silu(z)).reshape(2, 3, -1, group_size or 12)
  ref = _np_rms_norm(h, 1e-6).reshape(2, 3, 12) * weight
  np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_gated_rms_norm_rejects_bad_group_size():
  with pytest.raises(ValueError, match="group_size"):
    GatedRMSNorm(12, group_size=5)

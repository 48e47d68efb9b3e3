"""Log-Linear and DLA mixers (spec dla.md §12 P18): λ init, λ ≡ 1 equals the base mixer with the
same weights, the λ parameter count, and the decision metrics against the op's own record."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.layers import (DLAConfig, DLAGatedDeltaNet, DLAMamba2, LambdaScale, LogLinearConfig,
                         LogLinearGatedDeltaNet, LogLinearMamba2, multistate)
from layer_helpers import D_MODEL, make_mixer, params, rel_err, softplus

BACKBONES = ("mamba2", "gated_delta")
MODES = ("log_linear", "dla")
NAMED = {("mamba2", "dla"): DLAMamba2, ("mamba2", "log_linear"): LogLinearMamba2,
         ("gated_delta", "dla"): DLAGatedDeltaNet,
         ("gated_delta", "log_linear"): LogLinearGatedDeltaNet}
OPTIONS = dict(dla=DLAConfig(capacity=3, num_lambda=2, tau=0.5),
               log_linear=LogLinearConfig(num_levels=3))


def _named_mixer(backbone, mode, rng, **overrides):
  """The named multi-state mixer with `make_mixer`'s small shapes."""
  return make_mixer(backbone, rng, cls=NAMED[backbone, mode], **{mode: OPTIONS[mode]}, **overrides)


def _lambda_kernel(mixer):
  """W_λ `[d, H·Kλ]`: the trailing in_proj columns (Mamba-2) or l_proj (GDN)."""
  if hasattr(mixer, "l_proj"):
    return np.asarray(mixer.l_proj.kernel[...])
  width = mixer.num_heads * mixer.core.num_lambda
  return np.asarray(mixer.in_proj.kernel[...])[:, -width:]


def _copy_shared_params(src, dst) -> int:
  """Copies src's parameters into dst's (leading slices where dst is narrower, i.e. in_proj);
  returns the number of src parameters that dst lacks."""
  src_flat = dict(nnx.to_flat_state(nnx.state(src, nnx.Param)))
  dst_state = nnx.state(dst, nnx.Param)
  for path, var in nnx.to_flat_state(dst_state):
    var[...] = src_flat[path][...][tuple(slice(0, n) for n in var.shape)]
  nnx.update(dst, dst_state)
  count = lambda m: sum(math.prod(v.shape) for v in params(m).values())
  return count(src) - count(dst)


@nnx.jit
def _both(a, b, x):
  return a(x)[0], b(x)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_lambda_parametrisation_at_init(rng, backbone, mode):
  mixer = _named_mixer(backbone, mode, rng)
  assert mixer.core.mode == mode
  h, k_lam = mixer.num_heads, mixer.core.num_lambda
  assert k_lam == {"dla": 2, "log_linear": 3}[mode]
  assert isinstance(mixer.core.lam_scale, LambdaScale)
  np.testing.assert_array_equal(mixer.core.lam_scale[...], np.ones((h, k_lam)))
  w_lam = _lambda_kernel(mixer)
  assert w_lam.shape == (D_MODEL, h * k_lam)
  assert abs(w_lam.std() - multistate.LAMBDA_INIT_STD) < 0.25 * multistate.LAMBDA_INIT_STD
  x = rng.normal(size=(3, 5, D_MODEL))                                  # unit-RMS inputs
  lam = np.asarray(mixer.core.readout_weights(jnp.asarray(x @ w_lam, jnp.float32)))
  assert lam.shape == (3, 5, h, k_lam)
  np.testing.assert_allclose(lam, softplus(x @ w_lam).reshape(lam.shape), rtol=1e-5)
  assert np.all(np.abs(lam - np.log(2)) < 0.1) and abs(lam.mean() - np.log(2)) < 0.01


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_unit_lambda_equals_the_base_mixer(rng, backbone, mode):
  f64 = jnp.float64
  mixer = _named_mixer(backbone, mode, rng, dtype=f64, unit_lambda=True)
  base = make_mixer(backbone, rng, dtype=f64)
  extra = _copy_shared_params(mixer, base)
  h, k_lam = mixer.num_heads, mixer.core.num_lambda
  assert extra == D_MODEL * h * k_lam + h * k_lam
  x = jnp.asarray(rng.normal(size=(2, 19, D_MODEL)), f64)             # 19: chunk 8 ∤ T
  y, y_base = _both(mixer, base, x)
  assert rel_err(y, y_base) <= 1e-10


@pytest.mark.parametrize("backbone", BACKBONES)
def test_metrics_match_the_op_record(rng, backbone, dla_op_record):
  record = dla_op_record

  @nnx.jit
  def run(mixer, x):
    _, _, metrics = mixer(x, return_metrics=True)
    return metrics, record["aux"]                      # the op's record from the same trace

  mixer = _named_mixer(backbone, "dla", rng)
  x = jnp.asarray(rng.normal(size=(3, 21, D_MODEL)), jnp.float32)
  metrics, aux = run(mixer, x)
  boundary, t = np.asarray(aux.boundary, np.float64), x.shape[1]
  count = boundary.sum(axis=1)                                           # [B, H]
  expected = {
      "boundary_rate": boundary.mean(axis=(0, 1)),
      "mean_block_length": (t / count).mean(axis=0),
      "occupancy": np.asarray(aux.num_slots).mean(axis=(0, 1)) / 3,
      "merges": (np.asarray(aux.merge_idx) >= 0).sum(axis=1).mean(axis=0),
  }
  assert set(metrics) == set(expected) == set(multistate.METRIC_NAMES)
  for name, value in expected.items():
    assert metrics[name].shape == (mixer.num_heads,) and metrics[name].dtype == jnp.float32
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
  assert np.all(expected["merges"] >= 0) and expected["merges"].sum() > 0


def test_base_mixers_return_no_metrics(rng):
  mixer = make_mixer("attention", rng)
  x = jnp.asarray(rng.normal(size=(1, 3, D_MODEL)), jnp.float32)
  y, _, metrics = mixer(x, return_metrics=True)
  assert y.shape == x.shape and metrics == {}
  assert make_mixer("gated_delta", rng).core.lam_scale is None

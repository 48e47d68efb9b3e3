"""Mixer backends agree, and caches keep their shapes and dtypes through a call."""

import jax.numpy as jnp
import numpy as np
import pytest

from layer_helpers import D_MODEL, MIXER_NAMES, make_mixer, rel_err


@pytest.mark.parametrize("name", ("mamba2", "gated_delta"))
@pytest.mark.parametrize("impl", ("recurrent", "masked"))
def test_impls_agree(rng, name, impl):
  seed = int(rng.integers(1 << 30))
  x = jnp.asarray(rng.normal(size=(2, 11, D_MODEL)), jnp.float32)
  chunked, chunked_cache = make_mixer(name, np.random.default_rng(seed))(x)
  other, other_cache = make_mixer(name, np.random.default_rng(seed), impl=impl)(x)
  assert rel_err(other, chunked) <= 1e-5
  assert rel_err(other_cache[-1], chunked_cache[-1]) <= 1e-5


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_bfloat16_compute_keeps_cache_shapes_and_dtypes(rng, name):
  mixer = make_mixer(name, rng, dtype=jnp.bfloat16)
  cache = mixer.init_cache(2, 16, jnp.bfloat16)
  x = jnp.asarray(rng.normal(size=(2, 9, D_MODEL)), jnp.bfloat16)
  y, new_cache = mixer(x, cache=cache, pos=jnp.int32(0))
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  for before, after in zip(cache, new_cache):
    assert before.shape == after.shape and before.dtype == after.dtype
  if name != "attention":
    assert cache[-1].dtype == jnp.float32                 # the recurrent state stays fp32

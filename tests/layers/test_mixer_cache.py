"""Every mixer: prefill + step-by-step decode equals one full pass, for every way of splitting."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layer_helpers import D_MODEL, MIXER_NAMES, make_mixer, rel_err

PROMPT, STEPS = 13, 7                                   # prompt not a multiple of chunk 8
LENGTH = PROMPT + STEPS


@nnx.jit
def _apply(mixer, x, cache, pos):
  return mixer(x, cache=cache, pos=pos)


def _input(rng):
  return jnp.asarray(rng.normal(size=(2, LENGTH, D_MODEL)), jnp.float32)


def _assert_caches_close(got, want):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_prefill_then_decode_equals_full_pass(rng, name):
  mixer = make_mixer(name, rng)
  x = _input(rng)
  full, full_cache = _apply(mixer, x, None, None)
  cache = mixer.init_cache(2, LENGTH, jnp.float32)
  y, cache = _apply(mixer, x[:, :PROMPT], cache, jnp.int32(0))
  outs = [y]
  for t in range(PROMPT, LENGTH):
    y, cache = _apply(mixer, x[:, t:t + 1], cache, jnp.int32(t))
    outs.append(y)
  assert rel_err(jnp.concatenate(outs, axis=1), full) <= 1e-5
  _assert_caches_close(cache, full_cache)


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_decode_from_scratch_equals_full_pass(rng, name):
  mixer = make_mixer(name, rng)
  x = _input(rng)
  full, _ = _apply(mixer, x, None, None)
  cache = mixer.init_cache(2, LENGTH, jnp.float32)
  outs = []
  for t in range(LENGTH):
    y, cache = _apply(mixer, x[:, t:t + 1], cache, jnp.int32(t))
    outs.append(y)
  assert rel_err(jnp.concatenate(outs, axis=1), full) <= 1e-5


@pytest.mark.parametrize("name", ("mamba2", "gated_delta"))
def test_cache_of_a_fresh_call_continues_with_the_chunked_op(rng, name):
  mixer = make_mixer(name, rng)
  x = _input(rng)
  full, full_cache = _apply(mixer, x, None, None)
  y1, cache = _apply(mixer, x[:, :PROMPT], None, None)             # cache=None: fresh sequence
  y2, cache = _apply(mixer, x[:, PROMPT:], cache, jnp.int32(PROMPT))  # T > 1 continuation
  assert rel_err(jnp.concatenate([y1, y2], axis=1), full) <= 1e-5
  _assert_caches_close(cache, full_cache)

"""LanguageModel: prefill + decode and decode from an empty cache equal one full forward pass."""

import jax.numpy as jnp
import pytest

from dlax.models import MIXERS
from model_helpers import decode_step, forward, prefill, random_tokens, rel_err, tiny_model

PROMPT, STEPS = 13, 7                               # prompt not a multiple of chunk 8
LENGTH = PROMPT + STEPS


@pytest.mark.parametrize("mixer", MIXERS)
def test_prefill_then_decode_equals_full_pass(rng, mixer):
  model = tiny_model(mixer, rng)
  tokens = random_tokens(rng, (2, LENGTH))
  full = forward(model, tokens)
  assert full.shape == (2, LENGTH, 256) and full.dtype == jnp.float32
  logits, cache = prefill(model, tokens[:, :PROMPT], max_len=LENGTH)
  assert int(cache.pos) == PROMPT
  steps = [logits]
  for t in range(PROMPT, LENGTH):
    logits, cache = decode_step(model, tokens[:, t], cache)
    steps.append(logits[:, None])
  assert int(cache.pos) == LENGTH
  assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-5


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_from_empty_cache_equals_full_pass(rng, mixer):
  model = tiny_model(mixer, rng)
  tokens = random_tokens(rng, (2, LENGTH))
  full = forward(model, tokens)
  cache = model.init_cache(2, LENGTH)
  steps = []
  for t in range(LENGTH):
    logits, cache = decode_step(model, tokens[:, t], cache)
    steps.append(logits[:, None])
  assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-5


def test_cache_layers_are_stacked(rng):
  model = tiny_model("mamba2", rng)
  cache = model.init_cache(3, 16)
  assert cache.pos.dtype == jnp.int32 and cache.pos.shape == ()
  assert cache.layers.conv.shape[:2] == (2, 3) and cache.layers.ssm.dtype == jnp.float32


def test_attention_default_max_len_and_overflow(rng):
  model = tiny_model("attention", rng)
  tokens = random_tokens(rng, (1, 5))
  _, cache = model.prefill(tokens)
  assert cache.layers.k.shape[2] == 5 + 256
  _, cache = model.prefill(tokens, max_len=5)
  with pytest.raises(ValueError, match="KV cache holds 5 tokens"):
    model.decode_step(tokens[:, 0], cache)

"""Shared pieces of the model tests: jitted entry points and an error measure."""

import functools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.models import LanguageModel, tiny_config


def tiny_model(mixer: str, rng: np.random.Generator, **overrides) -> LanguageModel:
  """A tiny model (chunk 8, init_std 0.1 so every path carries signal)."""
  config = tiny_config(mixer, **{"chunk_size": 8, "init_std": 0.1, **overrides})
  return LanguageModel(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def random_tokens(rng: np.random.Generator, shape, vocab_size: int = 256):
  return jnp.asarray(rng.integers(0, vocab_size, size=shape), jnp.int32)


@nnx.jit
def forward(model, tokens):
  return model(tokens)


@functools.partial(nnx.jit, static_argnames="max_len")
def prefill(model, tokens, max_len=None):
  return model.prefill(tokens, max_len)


@nnx.jit
def decode_step(model, token, cache):
  return model.decode_step(token, cache)


def rel_err(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))

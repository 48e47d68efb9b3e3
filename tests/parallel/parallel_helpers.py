"""Shared pieces of the sharding and pipeline tests: tiny fp32 models, losses and error measures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.models import LanguageModel, tiny_config
from dlax.models.comet import CometForCausalLM, build_batch, tiny_comet_config
from dlax.models.comet.model import token_loss_sums
from dlax.models.qwen3 import Qwen3Config

N_DEVICES = 8
needs_8_devices = pytest.mark.skipif(
    len(jax.devices()) < N_DEVICES,
    reason=f"needs {N_DEVICES} devices (tests/conftest.py sets jax_num_cpu_devices)")

COMET_TEXT_VOCAB = 240   # tiny_comet_config's special ids start here
C = 16                   # tiny_comet_config's chunk size


def tiny_lm(rng: np.random.Generator, mixer: str, multistate: str = "none",
            **overrides) -> LanguageModel:
  """fp32 tiny LM (chunk 8, init_std 0.1 so every path carries signal), seeded from `rng`."""
  config = tiny_config(mixer, multistate, **{"chunk_size": 8, "init_std": 0.1, **overrides})
  return LanguageModel(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def tiny_comet(rng: np.random.Generator, n_layers: int = 2, std: float = 0.1,
               **overrides) -> CometForCausalLM:
  """fp32 CoMeT on a tiny Qwen3 (d 64, 4 heads, 2 KV heads); weights N(0, std²), norm weights
  U(0.5, 1.5) (tests/models/comet_reference.py uses std 0.2 in fp64)."""
  backbone = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, rope_theta=1e4)
  model = CometForCausalLM(backbone, tiny_comet_config(**overrides), rngs=nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var[...].shape
    value = (rng.uniform(0.5, 1.5, shape) if "norm" in "/".join(map(str, path))
             else rng.normal(0, std, shape))
    var[...] = jnp.asarray(value, jnp.float32)
  return model


def random_tokens(rng: np.random.Generator, shape, vocab: int = 256) -> np.ndarray:
  return np.asarray(rng.integers(0, vocab, shape), np.int32)


def comet_batch(rng: np.random.Generator, model: CometForCausalLM, n_rows: int, n_chunks: int):
  """Uniform layout [B, N, ...] of full chunks with random labels (a quarter ignored)."""
  ids = random_tokens(rng, (n_rows, n_chunks * C), COMET_TEXT_VOCAB)
  labels = np.where(rng.random(ids.shape) < 0.25, -100, ids).astype(np.int32)
  return build_batch(list(zip(ids, labels, [None] * n_rows)), model.config, layout="uniform")


def lm_loss(model: LanguageModel, tokens):
  """Mean next-token CE of tokens `[B, T]`."""
  return next_token_loss(model(tokens), tokens)


def next_token_loss(logits, tokens):
  total, count = token_loss_sums(logits[:, :-1], tokens[:, 1:])
  return total / count


def comet_loss(model: CometForCausalLM, layout):
  """Mean CE over every labelled token (spec §7.3) of a uniform layout, on one device."""
  logits, _ = model.forward_chunks(layout)
  total, count = token_loss_sums(logits, jnp.asarray(layout.labels))
  return total / count


def rel_err(actual, expected) -> float:
  """max |actual − expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_trees_close(actual, expected, tol: float = 1e-5) -> None:
  """Every leaf of `actual` within `tol` (relative to the leaf's max) of `expected`."""
  errors = {jax.tree_util.keystr(path): rel_err(a, e) for (path, a), e in
            zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected))}
  assert len(errors) == len(jax.tree.leaves(expected))
  bad = {k: v for k, v in errors.items() if not v <= tol}
  assert not bad, bad

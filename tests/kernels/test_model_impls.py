"""Model level: a `LanguageModel` whose linear-attention cores run the Pallas kernels (interpret mode
on CPU) gives the logits and parameter gradients of the same model on the XLA chunked path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from _helpers import assert_close
from dlax.models import LanguageModel, tiny_config

CORES = [("mamba2", "none"), ("gated_delta", "none"), ("mamba2", "dla"), ("gated_delta", "dla")]
CASES = [(impl, *core) for impl in ("pallas_triton", "pallas_tpu") for core in CORES]


def loss_and_grads(model: LanguageModel, tokens):
  def loss(params):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits

  graphdef, params = nnx.split(model)
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


@pytest.mark.parametrize("impl, mixer, multistate", CASES)
def test_kernel_model_matches_xla_model(rng, impl, mixer, multistate):
  # The TPU interpreter runs kernels through ordered IO callbacks, which `jax.checkpoint` cannot
  # differentiate: remat is off for it (compiled Mosaic kernels have no such effects).
  config = tiny_config(mixer, multistate, chunk_size=8, init_std=0.1,
                       remat=impl != "pallas_tpu")
  seed = int(rng.integers(1 << 30))
  tokens = jnp.asarray(rng.integers(0, 256, size=(2, 30)), jnp.int32)   # 29 inputs: not 8·n
  reference = loss_and_grads(LanguageModel(config, rngs=nnx.Rngs(seed)), tokens)
  kernel_config = dataclasses.replace(config, impl=impl)
  logits, grads = loss_and_grads(LanguageModel(kernel_config, rngs=nnx.Rngs(seed)), tokens)
  assert_close(logits, reference[0], 1e-5, f"{impl} logits")
  expected = dict(jax.tree_util.tree_leaves_with_path(reference[1]))
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    name = f"{impl} grad {jax.tree_util.keystr(path)}"
    assert_close(grad, expected[path], 1e-5, name)

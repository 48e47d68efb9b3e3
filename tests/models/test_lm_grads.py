"""LanguageModel training path: every parameter gets a finite, non-zero gradient."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dlax.models import MIXERS
from model_helpers import random_tokens, tiny_model


def next_token_loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits


loss_and_grads = nnx.jit(nnx.value_and_grad(next_token_loss, has_aux=True))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mixer", MIXERS)
def test_forward_and_gradients(rng, mixer, tied):
  model = tiny_model(mixer, rng, tie_embeddings=tied, init_std=0.02)
  assert (model.head is None) == tied
  tokens = random_tokens(rng, (2, 12))
  (loss, logits), grads = loss_and_grads(model, tokens)
  assert logits.shape == (2, 11, 256) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert np.isfinite(float(loss)) and abs(float(loss) - np.log(256)) < 1.0
  flat = nnx.to_flat_state(grads)
  assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, grad in flat:
    grad = np.asarray(grad[...])
    name = ".".join(map(str, path))
    assert np.all(np.isfinite(grad)), name
    if name.startswith("blocks."):                       # stacked: every layer must learn
      per_layer = np.abs(grad.reshape(grad.shape[0], -1)).max(axis=1)
      assert np.all(per_layer > 0), name
    else:
      assert np.abs(grad).max() > 0, name


def test_bfloat16_compute_gives_float32_logits(rng):
  model = tiny_model("attention", rng, dtype="bfloat16", param_dtype="float32")
  logits = model(random_tokens(rng, (2, 9)))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))

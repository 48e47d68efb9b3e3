"""Rematerialisation changes memory, not results: the same logits and gradients (in float64)."""

import jax
import numpy as np
import pytest
from flax import nnx

from dlax.models import MIXERS
from model_helpers import random_tokens, rel_err, tiny_model


def _loss(model, tokens):
  logits = model(tokens)
  return logits.var(), logits


_loss_and_grads = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))


@pytest.mark.parametrize("mixer", MIXERS)
def test_remat_on_and_off_agree(rng, mixer):
  seed = int(rng.integers(1 << 30))
  tokens = random_tokens(rng, (2, 11))
  results = []
  for remat in (True, False):
    # float64 so that differences in XLA's fusion decisions stay at ~1e-16; the recurrent impl
    # because remat acts on the layer scan, whatever op backend runs inside (faster to compile).
    model = tiny_model(mixer, np.random.default_rng(seed), remat=remat, impl="recurrent",
                       dtype="float64", param_dtype="float64")
    (_, logits), grads = _loss_and_grads(model, tokens)
    results.append((logits, grads))
  (logits_on, grads_on), (logits_off, grads_off) = results
  assert rel_err(logits_on, logits_off) <= 1e-12
  errors = jax.tree.map(rel_err, grads_on, grads_off)
  assert max(jax.tree.leaves(errors)) <= 1e-12, errors


@pytest.mark.parametrize("remat", [True, False])
def test_remat_flag_controls_checkpointing(rng, remat):
  model = tiny_model("attention", rng, remat=remat)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, random_tokens(rng, (1, 4)))
  assert ("remat" in str(jaxpr)) == remat               # jax.checkpoint's primitive

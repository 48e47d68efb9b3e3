"""GPipe layer-stage pipelining of `LanguageModel` (issue 5 item 7, acceptance 1) on 8 fake CPU
devices, fp32: loss and gradients equal the sequential single-device model (≤ 1e-5 relative) for
P ∈ {2, 4} stages and several microbatch counts, composed with data / fsdp / tensor sharding."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from parallel_helpers import (assert_trees_close, lm_loss, needs_8_devices, next_token_loss,
                              random_tokens, rel_err, tiny_lm)

from dlax.parallel import batch_sharding, make_mesh, param_shardings
from dlax.parallel.gpipe import (gpipe_blocks, gpipe_forward, merge_microbatches,
                                 pipeline_steps, split_microbatches)

pytestmark = needs_8_devices
N_LAYERS = 4


@functools.partial(jax.jit, static_argnums=0)
def _one_device(graphdef, params, tokens):
  return jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), tokens))(params)


def _pipelined(graphdef, mesh, num_microbatches: int):
  def loss(params, tokens):
    logits = gpipe_forward(nnx.merge(graphdef, params), tokens, mesh,
                           num_microbatches=num_microbatches)
    return next_token_loss(logits, tokens)
  return jax.value_and_grad(loss)


@pytest.mark.parametrize("mixer, multistate, stages, microbatches, mesh_sizes", [
    ("attention", "none", 2, 4, dict(data=1, fsdp=2, tensor=2)),
    ("attention", "none", 4, 2, dict(data=2)),
    ("attention", "none", 4, 8, dict(data=1, tensor=2)),
    ("mamba2", "dla", 2, 2, dict(data=2, fsdp=2)),
])
def test_gpipe_matches_sequential(rng, mixer, multistate, stages, microbatches, mesh_sizes):
  model = tiny_lm(rng, mixer, multistate, n_layers=N_LAYERS)
  tokens = random_tokens(rng, (8, 16))
  graphdef, params = nnx.split(model)
  expected_loss, expected_grads = _one_device(graphdef, params, tokens)

  mesh = make_mesh(**mesh_sizes, stage=stages)
  shardings = param_shardings(params, mesh)
  assert shardings["blocks"]["mlp"]["up"]["kernel"].spec[0] == "stage"
  step = jax.jit(_pipelined(graphdef, mesh, microbatches),
                 in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(NamedSharding(mesh, PartitionSpec()), shardings))
  loss, grads = step(jax.device_put(params, shardings), tokens)
  assert rel_err(loss, expected_loss) <= 1e-5
  assert_trees_close(grads, expected_grads)


def test_schedule_has_m_plus_p_minus_1_steps(rng):
  """One scan of M + P − 1 steps per stage, over scans of the L/P local layers."""
  model = tiny_lm(rng, "attention", n_layers=N_LAYERS)
  mesh = make_mesh(data=2, stage=4)
  x = model._embed(random_tokens(rng, (8, 16)))
  jaxpr = jax.make_jaxpr(lambda x: gpipe_blocks(model, x, mesh, num_microbatches=2))(x)
  lengths = [eqn.params["length"] for eqn in _eqns(jaxpr.jaxpr) if eqn.primitive.name == "scan"]
  assert pipeline_steps(2, 4) == 5
  assert sorted(set(lengths)) == [N_LAYERS // 4, 5]


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)


def test_microbatch_split_round_trips_and_errors(rng):
  x = np.arange(24).reshape(6, 4)
  micro = split_microbatches(x, 3)
  assert micro.shape == (3, 2, 4) and np.array_equal(micro[1], x[[1, 4]])
  assert np.array_equal(merge_microbatches(micro), x)
  with pytest.raises(ValueError, match="batch size 6 is not divisible by num_microbatches 4"):
    split_microbatches(x, 4)
  model = tiny_lm(rng, "attention", n_layers=2)
  with pytest.raises(ValueError, match="n_layers 2 is not divisible by the 4 pipeline stages"):
    gpipe_blocks(model, model._embed(random_tokens(rng, (4, 8))), make_mesh(data=2, stage=4),
                 num_microbatches=2)

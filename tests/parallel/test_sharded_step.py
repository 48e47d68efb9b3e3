"""Sharded training step (issue 5 item 6, acceptance 1): a jitted AdamW step with parameters,
optimizer state and batch sharded over data × fsdp × tensor (2 × 2 × 2 fake CPU devices) gives the
single-device loss, gradients and updated parameters (≤ 1e-5 relative, fp32)."""

from __future__ import annotations

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from parallel_helpers import (assert_trees_close, comet_batch, comet_loss, lm_loss,
                              needs_8_devices, random_tokens, rel_err, tiny_comet, tiny_lm)

from dlax.parallel import batch_sharding, make_mesh, optimizer_shardings, param_shardings

pytestmark = needs_8_devices


def _train_step(graphdef, loss_fn, tx):
  """(params, opt_state, batch) → (loss, grads, new params, new opt_state)."""
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, grads, optax.apply_updates(params, updates), opt_state
  return step


def _check_sharded_step(model, loss_fn, batch):
  """Runs the step on one device and sharded on a (2, 2, 2) mesh; compares every output and
  checks that the sharded outputs keep their shardings."""
  tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)
  step = _train_step(graphdef, loss_fn, tx)
  expected = jax.jit(step)(params, opt_state, batch)

  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  p_sh, o_sh = param_shardings(params, mesh), optimizer_shardings(opt_state, mesh)
  b_sh = jax.tree.map(lambda _: batch_sharding(mesh), batch)
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh),
                    out_shardings=(replicated, p_sh, p_sh, o_sh))
  args = jax.device_put((params, opt_state, batch), (p_sh, o_sh, b_sh))
  actual = sharded(*args)

  assert rel_err(actual[0], expected[0]) <= 1e-5
  assert_trees_close(actual[1:], expected[1:])
  specs = [s.spec for s in jax.tree.leaves(p_sh)]
  assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
  for array, sharding in zip(jax.tree.leaves(actual[1:]), jax.tree.leaves((p_sh, p_sh, o_sh))):
    assert array.sharding.is_equivalent_to(sharding, array.ndim)


@pytest.mark.parametrize("mixer, multistate", [("mamba2", "dla"), ("attention", "none")])
def test_lm_step_matches_one_device(rng, mixer, multistate):
  model = tiny_lm(rng, mixer, multistate)
  _check_sharded_step(model, lm_loss, random_tokens(rng, (8, 32)))


def test_comet_step_matches_one_device(rng):
  model = tiny_comet(rng)
  layout = comet_batch(rng, model, n_rows=4, n_chunks=3)
  _check_sharded_step(model, comet_loss, layout)

"""CoMeT parameter groups and optimizer (spec §4, §9) on the tiny float64 model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from comet_reference import TEXT_VOCAB, tiny_model
from flax import nnx

from dlax.models.comet.params import (BACKBONE, FROZEN, MEMORY, MEMORY_LR_MULTIPLIER,
                                      NEW_EMBEDDING_ROWS, comet_optimizer, comet_optimizer_for,
                                      param_labels, weight_decay_mask)


def _params(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


def _random_like(rng, tree):
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), tree)


def _first_updates(tx, params, grads):
  return tx.update(grads, tx.init(params), params)[0]


def _flat(tree) -> dict:
  return dict(nnx.to_flat_state(tree))


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-12, atol=1e-15)


def test_labels_cover_exactly_the_memory_nets(rng):
  model = tiny_model(rng)
  state = nnx.state(model, nnx.Param)
  labels = param_labels(model)
  assert jax.tree.structure(labels) == jax.tree.structure(nnx.as_pure(state))
  assert param_labels(state) == labels
  memory = {("memory_nets", *path) for path, _ in
            nnx.to_flat_state(nnx.state(model.memory_nets, nnx.Param))}
  assert len(memory) == 7
  assert {path for path, label in _flat(labels).items() if label == MEMORY} == memory
  assert set(_flat(labels).values()) == {MEMORY, BACKBONE}
  frozen = _flat(param_labels(model, freeze_backbone=True))
  assert frozen == {path: MEMORY if path in memory else NEW_EMBEDDING_ROWS
                    if path == ("backbone", "embedding") else FROZEN for path in frozen}


@pytest.mark.parametrize("schedule", [False, True])
def test_memory_learning_rate_is_five_times_the_base(rng, schedule):
  """Two nnx.Optimizer steps equal plain AdamW at lr on the backbone and at 5·lr on the memory
  nets, for a constant rate and for a schedule."""
  model = tiny_model(rng)
  lr = optax.linear_schedule(1e-3, 3e-3, 4) if schedule else 1e-3
  scaled = (lambda step: 5 * lr(step)) if schedule else 5 * lr
  decay = weight_decay_mask(model)
  tx = comet_optimizer(lr, labels=param_labels(model), decay_mask=decay, weight_decay=0.1,
                       clip_norm=None)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  start = _params(model)
  grads = [_random_like(rng, nnx.state(model, nnx.Param)) for _ in range(2)]
  for g in grads:
    optimizer.update(model, g)
  moved = _flat(jax.tree.map(jnp.subtract, _params(model), start))

  def plain(rate):
    params, tx = start, optax.adamw(rate, weight_decay=0.1, mask=decay)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(nnx.as_pure(g), state, params)
      params = optax.apply_updates(params, updates)
    return _flat(jax.tree.map(jnp.subtract, params, start))

  base, memory = plain(lr), plain(scaled)
  assert MEMORY_LR_MULTIPLIER == 5.0
  for path, delta in moved.items():
    _close(delta, (memory if path[0] == "memory_nets" else base)[path])


def test_vectors_are_never_decayed(rng):
  """Zero gradients: the update is −lr·wd·p for matrices (×5 on the memory nets) and 0 for norm
  weights (ndim 1 per layer, ndim 2 once stacked on [L])."""
  model = tiny_model(rng)
  lr, wd = 1e-2, 0.1
  params = _params(model)
  updates = _first_updates(comet_optimizer_for(model, lr, weight_decay=wd), params,
                           jax.tree.map(jnp.zeros_like, params))
  for path, update in _flat(updates).items():
    name, p = "/".join(path), _flat(params)[path]
    rate = lr * (MEMORY_LR_MULTIPLIER if path[0] == "memory_nets" else 1)
    _close(update, 0 * p if "norm" in name else -rate * wd * p)


def test_clipping_uses_the_global_norm(rng):
  """eps = 1 makes Adam's first step depend on the gradient scale: clipping to c equals scaling
  the gradients by c / ‖g‖ over all groups together."""
  model = tiny_model(rng)
  params = _params(model)
  grads = _random_like(rng, params)
  norm = float(optax.tree.norm(grads))
  assert norm > 10                                  # so that clipping to 1 is active
  clipped = _first_updates(comet_optimizer_for(model, 1e-3, eps=1.0, clip_norm=1.0), params, grads)
  rescaled = jax.tree.map(lambda g: g / norm, grads)
  expected = _first_updates(comet_optimizer_for(model, 1e-3, eps=1.0, clip_norm=None), params,
                            rescaled)
  jax.tree.map(_close, clipped, expected)


def test_frozen_backbone(rng):
  """freeze_backbone: only the memory nets and the new embedding rows move; frozen gradients
  change nothing, not even through the clipping norm."""
  model = tiny_model(rng, freeze_backbone=True)
  params = _params(model)
  grads = _random_like(rng, params)
  tx = comet_optimizer_for(model, 1e-3, eps=1.0, clip_norm=0.1)
  updates = _flat(_first_updates(tx, params, grads))
  for path, update in updates.items():
    update = np.asarray(update)
    if path[0] == "memory_nets":
      assert np.all(update != 0), path
    elif path == ("backbone", "embedding"):
      assert not np.any(update[:TEXT_VOCAB]) and np.all(update[TEXT_VOCAB:] != 0)
    else:
      assert not np.any(update), path
  noisy = _flat(_random_like(rng, params))
  frozen_noise = nnx.from_flat_state([
      (path, g if path[0] == "memory_nets" else
       np.where(np.arange(len(g))[:, None] >= TEXT_VOCAB, g, 1e3 * noisy[path])
       if path == ("backbone", "embedding") else 1e3 * noisy[path])
      for path, g in _flat(grads).items()])
  jax.tree.map(_close, _flat(_first_updates(tx, params, frozen_noise)), updates)
  with pytest.raises(ValueError, match="new_rows_mask"):
    comet_optimizer(1e-3, labels=param_labels(model), decay_mask=weight_decay_mask(model))

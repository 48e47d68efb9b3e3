"""build_optimizer: schedules, weight-decay masks, clipping and CoMeT's memory learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dlax.layers import LambdaScale
from dlax.models import LanguageModel
from dlax.models.comet import tiny_comet_config
from dlax.models.comet.model import CometForCausalLM
from dlax.models.comet.params import MEMORY, param_labels
from dlax.models.qwen3 import Qwen3Config
from dlax_training.config import load_config
from dlax_training.optim import build_optimizer, learning_rate_schedule, weight_decay_mask

BACKBONE = Qwen3Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e4)


def _params(model) -> nnx.State:
  return nnx.state(model, nnx.Param)


def _random_like(rng, tree, scale: float = 1.0):
  return jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), p.dtype), tree)


def _flat(tree) -> dict:
  return {path: leaf for path, leaf in nnx.to_flat_state(tree)}


def _lm(config) -> LanguageModel:
  """The abstract model (shapes only): masks and groups need no values."""
  return nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))


def _first_step(tx, params):
  """`grads -> (updates, state)` of a first optimizer step from `params`, jitted (eager optax is
  slow on hundreds of leaves)."""
  update, state = jax.jit(tx.update), tx.init(params)
  return lambda grads: update(grads, state, params)


def _first_moments(state) -> list:
  """Adam's first moments (a tree per parameter group)."""
  return [mu for _, mu in optax.tree.get_all_with_path(state, "mu")]


def _comet(rng) -> CometForCausalLM:
  """A tiny CoMeT with random N(0, 1) parameters (built abstractly: eager init is slow)."""
  model = nnx.eval_shape(lambda: CometForCausalLM(BACKBONE, tiny_comet_config(),
                                                  rngs=nnx.Rngs(0)))
  nnx.update(model, _random_like(rng, _params(model)))
  return model


# Schedules.


def test_cosine_schedule_values(rng):
  lr, warmup = float(rng.uniform(1e-4, 1e-2)), int(rng.integers(2, 50))
  total, ratio = warmup + int(rng.integers(10, 500)), float(rng.uniform(0, 0.5))
  config = load_config("tiny_demo", [f"optimizer.lr={lr!r}", f"schedule.warmup_steps={warmup}",
                                     f"schedule.total_steps={total}",
                                     f"schedule.min_lr_ratio={ratio!r}"])
  schedule = learning_rate_schedule(config)
  value = lambda step: float(schedule(step))
  assert value(0) == 0.0
  assert value(warmup // 2) == pytest.approx(lr * (warmup // 2) / warmup, rel=1e-5)
  assert value(warmup) == pytest.approx(lr, rel=1e-6)
  middle = (warmup + total) / 2
  if middle == int(middle):
    assert value(int(middle)) == pytest.approx(lr * (1 + ratio) / 2, rel=1e-5)
  assert value(total) == pytest.approx(lr * ratio, rel=1e-5, abs=1e-12)
  assert value(total + 100) == pytest.approx(lr * ratio, rel=1e-5, abs=1e-12)
  steps = np.arange(warmup, total + 1)
  assert np.all(np.diff([value(s) for s in steps]) <= 1e-12)   # monotone decay


def test_schedule_defaults_to_the_run_length_and_constant_kind(rng):
  lr, steps = float(rng.uniform(1e-4, 1e-2)), int(rng.integers(20, 200))
  config = load_config("tiny_demo", [f"optimizer.lr={lr!r}", f"steps={steps}",
                                     "schedule.warmup_steps=0", "schedule.min_lr_ratio=0"])
  schedule = learning_rate_schedule(config)
  assert float(schedule(0)) == pytest.approx(lr, rel=1e-6)     # no warm-up: peak at once
  assert float(schedule(steps)) == pytest.approx(0.0, abs=1e-12)
  config = load_config("tiny_demo", [f"optimizer.lr={lr!r}", "schedule.kind=constant",
                                     "schedule.warmup_steps=10"])
  schedule = learning_rate_schedule(config)
  assert [float(schedule(s)) for s in (0, 5)] == pytest.approx([0.0, lr / 2], rel=1e-6)
  assert [float(schedule(s)) for s in (10, 10_000)] == pytest.approx([lr, lr], rel=1e-6)


# Weight decay.


@pytest.mark.parametrize("overrides", [[], ["model.mixer=gated_delta"],
                                       ["model.multistate=log_linear"],
                                       ["model.mixer=attention", "model.multistate=none"]])
def test_decay_mask_excludes_vectors_and_lambda_scales(overrides):
  model = _lm(load_config("tiny_demo", overrides))
  mask, params = _flat(weight_decay_mask(model)), _flat(_params(model))
  assert mask.keys() == params.keys()
  for path, variable in params.items():
    per_layer_ndim = variable.get_value().ndim - (path[0] == "blocks")
    expected = per_layer_ndim >= 2 and not isinstance(variable, LambdaScale)
    assert mask[path] == expected, path
  names = {"/".join(map(str, path)): decayed for path, decayed in mask.items()}
  assert names["embedding"] and names["head/kernel"] and not names["final_norm/weight"]
  if "model.multistate=none" not in overrides:
    scales = [p for p, v in params.items() if isinstance(v, LambdaScale)]
    assert scales and not any(mask[p] for p in scales)     # 2-D [H, Kλ] per layer, yet excluded
    assert all(params[p].get_value().ndim == 3 for p in scales)


def test_adamw_decays_the_masked_params_and_clips_the_global_norm(rng):
  lr, wd, clip = (float(rng.uniform(1e-3, 1e-2)), float(rng.uniform(0.05, 0.5)),
                  float(rng.uniform(0.5, 2.0)))
  config = load_config("tiny_demo", [
      f"optimizer.lr={lr!r}", f"optimizer.weight_decay={wd!r}", f"optimizer.clip_norm={clip!r}",
      "optimizer.b1=0.9", "schedule.kind=constant", "schedule.warmup_steps=0"])
  model = _lm(config)
  params = _random_like(rng, _params(model))
  first_step = _first_step(build_optimizer(config, model), params)
  # Zero gradients: the update is the decoupled decay -lr·wd·p, on the masked params only.
  updates, _ = first_step(jax.tree.map(jnp.zeros_like, params))
  mask = _flat(weight_decay_mask(model))
  for path, update in _flat(updates).items():
    p = _flat(params)[path][...]
    expected = -lr * wd * p if mask[path] else np.zeros_like(p)
    np.testing.assert_allclose(update[...], expected, rtol=1e-5, atol=1e-12, err_msg=str(path))
  # Adam's first moment (1 - b1)·g sees the clipped gradient, below and above the threshold.
  for scale in (1e-4, 1e3):
    grads = _random_like(rng, params, scale)
    factor = min(1.0, clip / float(optax.tree.norm(grads)))
    [mu] = _first_moments(first_step(grads)[1])
    for path, got in _flat(mu).items():
      np.testing.assert_allclose(got[...], 0.1 * factor * _flat(grads)[path][...], rtol=1e-5,
                                 atol=1e-30, err_msg=str(path))


# CoMeT.


def test_comet_memory_learning_rate_multiplier(rng):
  """The multiplier is configurable (the 5× default is checked in the decay test below)."""
  lr, multiplier = float(rng.uniform(1e-5, 1e-3)), float(rng.uniform(1.5, 4.5))
  config = load_config("comet_qwen3_0.6b", [
      f"optimizer.lr={lr!r}", f"optimizer.memory_lr_multiplier={multiplier!r}",
      "schedule.kind=constant", "schedule.warmup_steps=0", "optimizer.clip_norm=null"])
  model = _comet(rng)
  params = _params(model)
  grads = _random_like(rng, params)
  updates, _ = _first_step(build_optimizer(config, model), params)(grads)
  labels = _flat(param_labels(model))
  eps = config.optimizer.eps
  seen = set()
  for path, update in _flat(updates).items():
    g = _flat(grads)[path][...]
    step_lr = lr * (multiplier if labels[path] == MEMORY else 1.0)
    # First Adam step: m̂ = g, v̂ = g², so the update is -lr·g / (|g| + eps) (no weight decay).
    np.testing.assert_allclose(update[...], -step_lr * g / (np.abs(g) + eps), rtol=1e-5,
                               err_msg=str(path))
    seen.add(labels[path])
  assert seen == {"backbone", MEMORY}


def test_comet_clipping_and_weight_decay_at_5x_for_memory(rng):
  lr, wd = float(rng.uniform(1e-4, 1e-3)), float(rng.uniform(0.05, 0.5))
  config = load_config("comet_qwen3_0.6b", [
      f"optimizer.lr={lr!r}", f"optimizer.weight_decay={wd!r}", "optimizer.clip_norm=0.5",
      "optimizer.b1=0.9", "schedule.kind=constant", "schedule.warmup_steps=0"])
  model = _comet(rng)
  params = _random_like(rng, _params(model))
  first_step = _first_step(build_optimizer(config, model), params)
  grads = _random_like(rng, params, 10.0)
  assert float(optax.tree.norm(grads)) > 0.5
  mu = _first_moments(first_step(grads)[1])
  assert float(optax.tree.norm(mu)) == pytest.approx(0.05, rel=1e-5)
  updates, _ = first_step(jax.tree.map(jnp.zeros_like, params))
  labels = _flat(param_labels(model))
  for path, update in _flat(updates).items():
    p = _flat(params)[path][...]
    stacked = path[0] == "memory_nets" or path[:2] == ("backbone", "blocks")
    step_lr = lr * (5.0 if labels[path] == MEMORY else 1.0)
    expected = -step_lr * wd * p if p.ndim - stacked >= 2 else np.zeros_like(p)
    np.testing.assert_allclose(update[...], expected, rtol=1e-5, atol=1e-12, err_msg=str(path))

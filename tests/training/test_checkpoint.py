"""Checkpointer: bit-exact round trips, keep-K, async saves, fallback past corrupt checkpoints, and
the non-finite loss stop."""

from __future__ import annotations

import gc
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dlax.models import LanguageModel
from dlax_training.checkpoint import (MANIFEST, Checkpointer, CheckpointError,
                                      CorruptCheckpointWarning, NonFiniteLossError, check_finite)
from dlax_training.config import config_from_dict, load_config, to_dict
from dlax_training.optim import build_optimizer


def _state(rng) -> dict:
  """Params, AdamW state after one random step, step counter and RNG key, all random."""
  params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
            "blocks": {"k": jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)}}
  tx = optax.adamw(1e-2)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  return {"params": params, "opt_state": opt_state,
          "step": jnp.asarray(rng.integers(1, 1 << 30), jnp.int32),
          "rng": jax.random.key(int(rng.integers(1 << 31)))}


def _data_state(rng) -> dict:
  return {"epoch": int(rng.integers(100)), "position": int(rng.integers(1 << 40)),
          "shuffle": [int(n) for n in rng.integers(0, 1000, 4)]}


def _bits(tree) -> list[np.ndarray]:
  """The raw bytes of every leaf (keys as their key data), for bit-exact comparisons."""
  def raw(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    return np.asarray(leaf).reshape(-1).view(np.uint8)
  return [raw(leaf) for leaf in jax.tree.leaves(tree)]


def _assert_same_arrays(restored, expected) -> None:
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for got, want in zip(_bits(restored), _bits(expected)):
    np.testing.assert_array_equal(got, want)


def _assert_same(restored, expected) -> None:
  _assert_same_arrays(restored, expected)
  assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(expected["rng"])


def _files(folder) -> list[str]:
  """Data files of a step folder, largest first (the array payload)."""
  paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
           if name != MANIFEST]
  return sorted(paths, key=os.path.getsize, reverse=True)


# Round trips.


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bit_exact(rng, tmp_path, async_save):
  state, data_state = _state(rng), _data_state(rng)
  config = load_config("tiny_demo", [f"seed={int(rng.integers(1000))}"])
  with Checkpointer(tmp_path, every_steps=10, async_save=async_save) as checkpointer:
    assert checkpointer.save(10, state, data_state=data_state, config=config)
    restored = checkpointer.restore_latest(jax.tree.map(jnp.zeros_like, state))
  assert restored.step == 10
  _assert_same(restored.state, state)
  assert restored.data_state == data_state
  assert config_from_dict(restored.config) == config and restored.config == to_dict(config)


def test_round_trip_of_model_params_and_optimizer_state(rng, tmp_path):
  """nnx parameter States and the masked AdamW state of `build_optimizer` (tiny DLA model)."""
  config = load_config("tiny_demo")
  model = nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0)))
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype),
                        nnx.state(model, nnx.Param))
  tx = build_optimizer(config, model)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  _, opt_state = jax.jit(tx.update)(grads, tx.init(params), params)
  state = {"params": params, "opt_state": opt_state, "step": jnp.asarray(1, jnp.int32),
           "rng": jax.random.key(int(rng.integers(1 << 31)))}
  with Checkpointer(tmp_path, every_steps=1) as checkpointer:
    checkpointer.save(1, state, config=config)
    restored = checkpointer.restore_latest(jax.eval_shape(lambda: state))
  _assert_same(restored.state, state)


def test_bytes_data_state_and_restore_from_shapes(rng, tmp_path):
  state, data_state = _state(rng), rng.bytes(64)
  with Checkpointer(tmp_path, every_steps=1) as checkpointer:
    checkpointer.save(3, state, data_state=data_state)
    abstract = jax.eval_shape(lambda: state)
    restored = checkpointer.restore(3, abstract)
  _assert_same(restored.state, state)
  assert restored.data_state == data_state and restored.config is None


def test_restore_uses_the_target_sharding(rng, tmp_path):
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("x",))
  saved_as = jax.sharding.SingleDeviceSharding(devices[0])
  state = {"w": jax.device_put(jnp.asarray(rng.normal(size=(2 * len(devices), 3)), jnp.float32),
                               saved_as),
           "step": jax.device_put(jnp.asarray(7, jnp.int32), saved_as)}
  target = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None)),
            "step": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state, target)
  with Checkpointer(tmp_path, every_steps=1) as checkpointer:
    checkpointer.save(1, state)
    restored = checkpointer.restore_latest(abstract).state
  assert jax.tree.map(lambda a: a.sharding, restored) == target
  _assert_same_arrays(restored, state)


def test_empty_directory_restores_nothing(rng, tmp_path):
  assert Checkpointer(tmp_path / "new").restore_latest(_state(rng)) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_wrong_abstract_state_is_a_clear_error(rng, tmp_path):
  state = _state(rng)
  with Checkpointer(tmp_path, every_steps=1) as checkpointer:
    checkpointer.save(1, state)
    wrong = {**state, "params": {**state["params"], "w": jnp.zeros((4, 4), jnp.float32)}}
    with pytest.raises(CheckpointError, match="passed its integrity check but does not restore"):
      checkpointer.restore_latest(wrong)
  gc.collect()   # orbax's aborted restore leaves coroutines behind; collect them here


# Schedule and pruning.


def test_saves_every_n_steps_and_keeps_the_latest_k(rng, tmp_path):
  every, keep = int(rng.integers(2, 4)), int(rng.integers(1, 3))
  states = {}
  with Checkpointer(tmp_path, every_steps=every, keep=keep) as checkpointer:
    for step in range(1, 4 * every + 1):
      state = _state(rng)
      if checkpointer.save(step, state, data_state={"step": step}):
        states[step] = state
    assert sorted(states) == [every * i for i in range(1, 5)]
    assert not checkpointer.save(4 * every, _state(rng), force=True)   # already saved
    kept = sorted(states)[-keep:][::-1]
    assert checkpointer.steps() == kept
    assert sorted(os.listdir(tmp_path)) == sorted(map(str, kept))
    restored = checkpointer.restore_latest(states[kept[0]])
  _assert_same(restored.state, states[kept[0]])
  assert restored.data_state == {"step": kept[0]}


def test_async_save_snapshots_the_state(rng, tmp_path):
  state = _state(rng)
  saved = np.asarray(state["params"]["w"])
  checkpointer = Checkpointer(tmp_path, every_steps=5, async_save=True)
  checkpointer.save(5, state, data_state={"a": 1})
  state["params"]["w"] = state["params"]["w"] + 1.0     # the saved copy is not affected
  reader = Checkpointer(tmp_path)                       # e.g. an eval process
  checkpointer.wait()
  restored = reader.restore_latest(state)
  assert restored.step == 5 and restored.data_state == {"a": 1}
  np.testing.assert_array_equal(restored.state["params"]["w"], saved)
  checkpointer.close()


# Corruption.


def _corrupt(folder, how: str, rng) -> None:
  target = _files(folder)[0]
  if how == "truncate":
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 2)
  elif how == "garble":
    with open(target, "r+b") as f:
      data = bytearray(f.read())
      i = int(rng.integers(len(data)))
      data[i] ^= 0xFF
      f.seek(0)
      f.write(data)
  elif how == "delete":
    os.remove(target)
  elif how == "no_manifest":
    os.remove(os.path.join(folder, MANIFEST))
  elif how == "bad_manifest":
    with open(os.path.join(folder, MANIFEST), "w") as f:
      f.write('{"files": ')


@pytest.mark.parametrize("how", ["truncate", "garble", "delete", "no_manifest", "bad_manifest"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(rng, tmp_path, how):
  old, new = _state(rng), _state(rng)
  with Checkpointer(tmp_path, every_steps=10) as checkpointer:
    checkpointer.save(10, old, data_state={"step": 10})
    checkpointer.save(20, new, data_state={"step": 20})
  _corrupt(tmp_path / "20", how, rng)
  checkpointer = Checkpointer(tmp_path, every_steps=10)
  with pytest.warns(CorruptCheckpointWarning, match=r"checkpoint .*20 is unusable"):
    restored = checkpointer.restore_latest(old)
  assert restored.step == 10 and restored.data_state == {"step": 10}
  _assert_same(restored.state, old)
  # Training resumes from 10 and saves 20 again: the corrupt folder is moved aside.
  again = _state(rng)
  assert checkpointer.save(20, again)
  checkpointer.wait()
  assert sorted(os.listdir(tmp_path)) == ["10", "20", "20.corrupt"]
  _assert_same(checkpointer.restore_latest(old).state, again)


def test_all_checkpoints_corrupt_is_a_clear_error(rng, tmp_path):
  with Checkpointer(tmp_path, every_steps=1) as checkpointer:
    for step in (1, 2):
      checkpointer.save(step, _state(rng))
  _corrupt(tmp_path / "1", "garble", rng)
  _corrupt(tmp_path / "2", "no_manifest", rng)
  with pytest.warns(CorruptCheckpointWarning):
    with pytest.raises(CheckpointError) as info:
      Checkpointer(tmp_path).restore_latest(_state(rng))
  message = str(info.value)
  assert f"no usable checkpoint in {tmp_path}" in message
  assert "step 2: no dlax_manifest.json: the save did not complete" in message
  assert "step 1: " in message and "does not match its checksum" in message


def test_leftover_temporary_folders_are_removed_by_the_writer(rng, tmp_path):
  leftover = tmp_path / "30.orbax-checkpoint-tmp-1234"
  leftover.mkdir(parents=True)
  (leftover / "partial").write_bytes(b"\0" * 10)
  checkpointer = Checkpointer(tmp_path, every_steps=10)
  assert checkpointer.restore_latest(_state(rng)) is None and leftover.exists()   # readers keep it
  checkpointer.save(10, _state(rng))
  checkpointer.close()
  assert sorted(os.listdir(tmp_path)) == ["10"]


def test_manifest_lists_every_file(rng, tmp_path):
  with Checkpointer(tmp_path, every_steps=1) as checkpointer:
    checkpointer.save(1, _state(rng))
  manifest = json.loads((tmp_path / "1" / MANIFEST).read_text())
  listed = {os.path.join(tmp_path, "1", name) for name in manifest["files"]}
  assert listed == set(_files(tmp_path / "1")) and manifest["step"] == 1


# Non-finite losses.


def test_finite_loss_passes(rng):
  loss = float(rng.uniform(0, 10))
  assert check_finite(jnp.asarray(loss, jnp.float32), 3) == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_stops_with_a_diagnostic(rng, bad):
  step = int(rng.integers(1, 10_000))
  grads = {"blocks": {"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)},
           "head": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  grads["blocks"]["w"] = grads["blocks"]["w"].at[1, 2].set(bad)
  params = jax.tree.map(jnp.ones_like, grads)
  with pytest.raises(NonFiniteLossError) as info:
    check_finite(jnp.asarray(bad, jnp.float32), step, grads=grads, params=params)
  error = info.value
  assert error.step == step and (math.isnan(error.loss) if math.isnan(bad) else error.loss == bad)
  assert error.nonfinite == {"gradients": ["blocks/w"], "parameters": []}
  message = str(error)
  assert f"non-finite training loss at step {step}: loss={float(bad)}" in message
  assert "non-finite gradients: blocks/w" in message and "all parameters finite" in message
  assert "last good one" in message


def test_non_finite_grad_norm_stops_even_with_a_finite_loss(rng):
  with pytest.raises(NonFiniteLossError, match="grad_norm=nan"):
    check_finite(float(rng.uniform(1, 2)), 7, grad_norm=jnp.asarray(jnp.nan, jnp.float32))

"""Mesh construction and the logical-axis rules (issue 5 item 6): every parameter of every dlax
model has logical axes; a dim is sharded only where the mesh axis exists and divides it."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from parallel_helpers import needs_8_devices, tiny_comet, tiny_lm

from dlax.parallel import (batch_sharding, logical_axes, make_mesh, optimizer_shardings,
                           param_shardings)

pytestmark = needs_8_devices


def test_logical_axes_cover_every_parameter(rng):
  """Every parameter of every model kind has logical axes of its rank; stacked layers lead with
  "layers"; an unknown parameter is an error."""
  models = [tiny_lm(rng, m, s) for m, s in [("mamba2", "dla"), ("mamba2", "log_linear"),
                                            ("gated_delta", "dla"), ("attention", "none")]]
  models.append(tiny_comet(rng))
  for model in models:
    flat = jax.tree_util.tree_flatten_with_path(logical_axes(model),
                                                is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, spec), leaf in zip(flat[0], jax.tree.leaves(nnx.state(model))):
      assert len(spec) == leaf.ndim, (path, spec)
      assert ("layers" in spec) == ("blocks" in jax.tree_util.keystr(path) or
                                    "memory_nets" in jax.tree_util.keystr(path))
  with pytest.raises(ValueError, match="no logical axes for parameter 'extra/kernel'"):
    logical_axes({"extra": {"kernel": np.zeros((2, 3), np.float32)}})


def test_shardings_follow_mesh_and_divisibility():
  """Rules apply only where the mesh axis exists and divides the dim; 'layers' goes to 'stage';
  −1 fills the mesh; bad sizes are clear errors."""
  params = {"blocks": {"mlp": {"up": {"kernel": np.zeros((4, 6, 10), np.float32)}}},
            "embedding": np.zeros((10, 6), np.float32)}
  mesh = make_mesh(fsdp=2, tensor=2, stage=2)
  assert mesh.shape == {"data": 1, "fsdp": 2, "tensor": 2, "stage": 2}
  shardings = param_shardings(params, mesh)
  assert shardings["blocks"]["mlp"]["up"]["kernel"].spec == PartitionSpec("stage", "fsdp", "tensor")
  assert shardings["embedding"].spec == PartitionSpec("tensor", "fsdp")
  three = make_mesh(data=1, fsdp=3, devices=jax.devices()[:3])
  assert param_shardings(params, three)["embedding"].spec == PartitionSpec("tensor", "fsdp")
  assert param_shardings(params, three)["blocks"]["mlp"]["up"]["kernel"].spec == PartitionSpec(
      "stage", "fsdp", "tensor")
  odd = {"embedding": np.zeros((10, 7), np.float32)}
  assert param_shardings(odd, three)["embedding"].spec == PartitionSpec("tensor", None)
  assert batch_sharding(make_mesh(data=2, fsdp=4)).spec == PartitionSpec(("data", "fsdp"))
  with pytest.raises(ValueError, match="needs 4 devices"):
    make_mesh(data=2, tensor=2)
  with pytest.raises(ValueError, match="at most one −1"):
    make_mesh(data=-1, fsdp=-1)


def test_optimizer_state_mirrors_params(rng):
  """AdamW's moments shard like their parameters; its step count is replicated."""
  params = nnx.state(tiny_lm(rng, "attention"))
  mesh = make_mesh(data=2, fsdp=2, tensor=2)
  opt_state = optax.adamw(1e-3).init(params)
  shardings = optimizer_shardings(opt_state, mesh)
  expected = param_shardings(params, mesh)
  adam = shardings[0]
  assert adam.count.spec == PartitionSpec()
  for moments in (adam.mu, adam.nu):
    assert jax.tree.leaves(moments) == jax.tree.leaves(expected)

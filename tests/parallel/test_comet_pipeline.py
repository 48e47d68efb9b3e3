"""CoMeT's chunk-wavefront pipeline (spec comet.md §10, §15.11; issue 5 item 7, acceptance 1) on 8
fake CPU devices, fp32: loss, gradients and each stage's last-layer hidden states equal the
single-device run (≤ 1e-5 relative) for P ∈ {2, 4}; the time loop has L + P − 1 steps (the naive
hand-off P·L); parameter gradients are the sum of the stages' contributions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from parallel_helpers import (assert_trees_close, comet_batch, comet_loss, needs_8_devices,
                              rel_err, tiny_comet)

from dlax.parallel import make_mesh, param_shardings
from dlax.parallel.comet_pipeline import (COMET_PIPELINE_RULES, comet_pipeline,
                                          comet_pipeline_loss, pipeline_steps, stage_loss_sums)

pytestmark = needs_8_devices
N_LAYERS, N_CHUNKS, N_ROWS = 3, 4, 4


def _model_and_batch(rng):
  model = tiny_comet(rng, n_layers=N_LAYERS)
  return model, comet_batch(rng, model, N_ROWS, N_CHUNKS)


@functools.partial(jax.jit, static_argnums=0)
def _one_device(graphdef, params, layout):
  """(loss, grads, last-layer hidden states `[B, N, Lmax, d]`) without a mesh."""
  loss, grads = jax.value_and_grad(lambda p: comet_loss(nnx.merge(graphdef, p), layout))(params)
  hidden, _ = nnx.merge(graphdef, params)._forward_hidden(layout, "chunk")
  return loss, grads, jnp.moveaxis(hidden, 0, 1)


def _pipelined(graphdef, mesh, schedule="wavefront"):
  def run(params, layout):
    def loss(params):
      (total, count), hidden = comet_pipeline(nnx.merge(graphdef, params), layout, mesh,
                                              schedule=schedule)
      return total / count, hidden
    (loss, hidden), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return loss, grads, hidden
  return jax.jit(run)


def _check(actual, expected, mesh):
  loss, grads, hidden = actual
  assert rel_err(loss, expected[0]) <= 1e-5
  assert_trees_close(grads, expected[1])
  n = N_CHUNKS // mesh.shape["stage"]
  for stage in range(mesh.shape["stage"]):      # each stage's final h: the last layer's output
    block = slice(stage * n, (stage + 1) * n)
    assert rel_err(hidden[:, block], expected[2][:, block]) <= 1e-5
  assert hidden.sharding.spec[1] == "stage"


@pytest.mark.parametrize("stages, mesh_sizes", [(2, dict(data=1, fsdp=2, tensor=2)),
                                                (4, dict(data=2))])
def test_wavefront_matches_one_device(rng, stages, mesh_sizes):
  """P = 2 composed with fsdp × tensor parameter sharding; P = 4 with 2 data shards."""
  model, layout = _model_and_batch(rng)
  graphdef, params = nnx.split(model)
  expected = _one_device(graphdef, params, layout)
  mesh = make_mesh(**mesh_sizes, stage=stages)
  shardings = param_shardings(params, mesh, COMET_PIPELINE_RULES)
  _check(_pipelined(graphdef, mesh)(jax.device_put(params, shardings), layout), expected, mesh)


def test_sequential_handoff_matches_one_device(rng):
  model, layout = _model_and_batch(rng)
  graphdef, params = nnx.split(model)
  mesh = make_mesh(data=2, stage=4)
  _check(_pipelined(graphdef, mesh, "sequential")(params, layout),
         _one_device(graphdef, params, layout), mesh)


def _scan_lengths(jaxpr) -> list[int]:
  """Lengths of every `scan` in a jaxpr, nested ones (shard_map, cond, checkpoint) included."""
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      lengths.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        sub = getattr(sub, "jaxpr", sub)                    # ClosedJaxpr → Jaxpr
        if hasattr(sub, "eqns"):
          lengths += _scan_lengths(sub)
  return lengths


@pytest.mark.parametrize("stages", [2, 4])
def test_time_loop_steps(rng, stages):
  """The wavefront's time loop is one scan of L + P − 1 steps; the naive hand-off scans P phases
  of L steps (P·L); the inner scans run over the N/P local chunks."""
  model, layout = _model_and_batch(rng)
  graphdef, params = nnx.split(model)
  mesh = make_mesh(data=-1, stage=stages)
  assert pipeline_steps(N_LAYERS, stages) == N_LAYERS + stages - 1
  assert pipeline_steps(N_LAYERS, stages, "sequential") == stages * N_LAYERS
  for schedule, loops in [("wavefront", [N_LAYERS + stages - 1]),
                          ("sequential", [stages, N_LAYERS])]:
    loss = lambda p: comet_pipeline_loss(nnx.merge(graphdef, p), layout, mesh, schedule=schedule)
    lengths = _scan_lengths(jax.make_jaxpr(loss)(params).jaxpr)
    assert sorted(set(lengths)) == sorted({*loops, N_CHUNKS // stages}), (schedule, lengths)


def test_parameter_grads_are_summed_over_stages(rng):
  """With a separate copy of the parameters per stage (in_specs P('stage')), each stage's
  gradient is its own contribution; they differ, and their sum is the single-device gradient
  (layer parameters; the embedding lookup runs outside the pipeline)."""
  model, layout = _model_and_batch(rng)
  graphdef, params = nnx.split(model)
  stages = 4
  mesh = make_mesh(data=2, stage=stages)

  def body(copies, h, chunks):
    state = jax.tree.map(lambda a: a[0], copies)
    (total, count), _ = stage_loss_sums(nnx.merge(graphdef, state), h, chunks)
    return total / count

  chunked = PartitionSpec("data", "stage")
  per_stage = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec("stage"), chunked, chunked),
                            out_specs=PartitionSpec(), axis_names={"data", "stage"})
  copies = jax.tree.map(lambda a: jnp.broadcast_to(a, (stages, *a.shape)), params)
  h = model.backbone._embed(jnp.asarray(layout.input_ids))
  grads = jax.jit(jax.grad(per_stage))(copies, h, layout)
  expected = _one_device(graphdef, params, layout)[1]
  for name in ("memory_nets", "backbone/blocks"):
    part = lambda tree: functools.reduce(lambda t, key: t[key], name.split("/"), tree)
    assert_trees_close(jax.tree.map(lambda g: g.sum(0), part(grads)), part(expected))
  block = np.asarray(grads["backbone"]["blocks"]["mlp"]["up"]["kernel"][...])
  assert all(np.abs(block[r]).max() > 1e-2 * np.abs(block).max() for r in range(stages))
  assert rel_err(block[0], block.sum(0)) > 1e-2
  # The memory written from the last chunk is never read: the last stage's memory nets get 0.
  nets = np.asarray(grads["memory_nets"]["temp_net"]["rla"]["up_proj"]["kernel"][...])
  assert np.all(nets[-1] == 0) and all(np.abs(nets[r]).max() > 0 for r in range(stages - 1))


def test_bad_inputs_are_clear_errors(rng):
  model, layout = _model_and_batch(rng)
  with pytest.raises(ValueError, match="4 chunks × 4 rows do not split over 8 stages"):
    comet_pipeline(model, layout, make_mesh(data=1, stage=8))
  with pytest.raises(ValueError, match="uniform ChunkLayout"):
    comet_pipeline(model, [layout], make_mesh(data=2, stage=4))
  with pytest.raises(ValueError, match="schedule must be"):
    comet_pipeline(model, layout, make_mesh(data=2, stage=4), schedule="circular")

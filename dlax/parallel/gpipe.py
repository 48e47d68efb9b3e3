"""GPipe layer-stage pipelining of a `LanguageModel`'s blocks over the mesh axis 'stage'.

The blocks' parameters are stacked on a leading [L] axis; stage r holds layers
`[r·L/P, (r+1)·L/P)` (`PartitionSpec('stage')` on that axis, L % P == 0). The batch is cut into M
microbatches; at step t stage r runs its layers on microbatch t − r, then `ppermute` hands the
result to stage r + 1. The M + P − 1 steps are one `lax.scan` inside `jax.shard_map`, manual over
'stage' only, so data / fsdp / tensor sharding stays automatic (GSPMD) and composes. Embedding,
final norm and head run outside the pipeline. Schedule structure after MaxText's
`layers/pipeline.py` (no circular repeats).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from dlax.models.lm import LanguageModel

STAGE = "stage"


def pipeline_steps(num_microbatches: int, num_stages: int) -> int:
  """Length of the GPipe forward schedule: M + P − 1."""
  return num_microbatches + num_stages - 1


def run_layers(graphdef: nnx.GraphDef, layers: nnx.State, x, *, remat: bool):
  """x `[B, T, d]` through blocks stacked on a leading axis (`lax.scan`, each block under
  `jax.checkpoint` when `remat`)."""
  def body(x, layer):
    return nnx.merge(graphdef, layer)(x)[0], None

  return jax.lax.scan(jax.checkpoint(body) if remat else body, x, layers)[0]


def split_microbatches(x, num_microbatches: int):
  """`[B, ...]` → `[M, B/M, ...]`, microbatch m = rows m, m + M, … (keeps a batch sharding on the
  B/M axis); `merge_microbatches` inverts it."""
  batch = x.shape[0]
  if batch % num_microbatches:
    raise ValueError(f"batch size {batch} is not divisible by num_microbatches "
                     f"{num_microbatches}")
  return jnp.swapaxes(x.reshape(batch // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1)


def merge_microbatches(x):
  """`[M, B/M, ...]` → `[B, ...]` (inverse of `split_microbatches`)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def stage_pipeline(graphdef: nnx.GraphDef, layers: nnx.State, microbatches, *, remat: bool,
                   axis: str = STAGE):
  """Per-stage body (inside `shard_map`, manual over `axis`).

  Args:
    graphdef: a block's graph. layers: this stage's L/P blocks, stacked. microbatches:
      `[M, b, T, d]`, the same on every stage (stage 0 reads them).

  Returns:
    `[M, b, T, d]`, the last stage's outputs, on every stage.

  In a bubble a stage computes on real microbatches and discards the result (`where`, not
  `cond`): the stages run in lockstep, so this costs no time, collectives that the partitioner
  puts inside a `cond` (fsdp / tensor sharding) would deadlock, and real inputs keep the
  discarded values finite (a NaN there would reach the gradients through `where`).
  """
  stage, num_stages = jax.lax.axis_index(axis), jax.lax.axis_size(axis)
  num_microbatches = microbatches.shape[0]
  steps = pipeline_steps(num_microbatches, num_stages)
  inputs = microbatches[jnp.arange(steps) % num_microbatches]   # stage 0, step t: microbatch t
  forward = [(i, i + 1) for i in range(num_stages - 1)]

  def step(received, inputs_t):
    t, x_t = inputs_t
    x = jnp.where(stage == 0, x_t, received)
    active = (t >= stage) & (t - stage < num_microbatches)
    y = jnp.where(active, run_layers(graphdef, layers, x, remat=remat), x)
    return jax.lax.ppermute(y, axis, forward), y

  _, outputs = jax.lax.scan(step, microbatches[0], (jnp.arange(steps), inputs))
  last = outputs[num_stages - 1:]                            # microbatch m left at step m + P − 1
  return jax.lax.psum(jnp.where(stage == num_stages - 1, last, 0), axis)


def gpipe_blocks(model: LanguageModel, x, mesh: Mesh, *, num_microbatches: int):
  """`model`'s blocks over x `[B, T, d]` as a GPipe pipeline over `mesh`'s 'stage' axis → `[B, T,
  d]`, equal to the sequential scan. Call inside `jax.jit`; B % M == 0, L % P == 0."""
  num_stages, num_layers = mesh.shape[STAGE], model.config.n_layers
  if num_layers % num_stages:
    raise ValueError(f"n_layers {num_layers} is not divisible by the {num_stages} pipeline "
                     f"stages")
  graphdef, layers = nnx.split(model.blocks)
  body = functools.partial(stage_pipeline, graphdef, remat=model.config.remat)
  # check_vma=False: the ops' scans start from zero states that are not typed as varying over
  # 'stage'; the transpose then sums the replicated input's cotangent over 'stage' itself.
  pipeline = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(STAGE), PartitionSpec()),
                           out_specs=PartitionSpec(), axis_names={STAGE}, check_vma=False)
  return merge_microbatches(pipeline(layers, split_microbatches(x, num_microbatches)))


def gpipe_forward(model: LanguageModel, tokens, mesh: Mesh, *, num_microbatches: int):
  """tokens `[B, T]` → logits `[B, T, V]` with the blocks pipelined (`gpipe_blocks`); equals
  `model(tokens)`."""
  x = gpipe_blocks(model, model._embed(tokens), mesh, num_microbatches=num_microbatches)
  return model._logits(x)

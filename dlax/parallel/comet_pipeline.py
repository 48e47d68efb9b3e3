"""CoMeT's layer-level chunk-wavefront pipeline (spec comet.md §10): context parallelism over
chunks.

The N chunks of every sequence are split over the mesh axis 'stage' in contiguous blocks of N/P;
every stage holds all layers (parameters replicated over 'stage'). Cell (τ, l) needs (τ, l−1) for
its hidden states and (τ−1, l) for layer l's memory, so stage r can run layer l as soon as stage
r−1 has run it: in the skewed time loop stage r runs layer `t − r` over its chunks at step t and
`ppermute`s that layer's final memory to stage r+1, which needs it at step t+1. The forward takes
L + P − 1 steps; `jax.grad` transposes `ppermute` into the backward wavefront. The naive hand-off
("sequential": stage r starts after stage r−1 has run all L layers) takes P·L steps.

The loss is Σ CE over each stage's own labelled tokens and the label count, psummed over
('data', 'stage'); parameter cotangents are summed over both axes by `shard_map`'s transpose.
Mesh axes other than 'data' and 'stage' (fsdp, tensor) stay automatic.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from dlax.models.comet.layout import ChunkLayout
from dlax.models.comet.model import CometForCausalLM, token_loss_sums
from dlax.parallel.mesh import LOGICAL_AXIS_RULES

STAGE, DATA = "stage", "data"
Schedule = Literal["wavefront", "sequential"]
# Parameter sharding rules for this pipeline: stacked layers are replicated over 'stage'.
COMET_PIPELINE_RULES = tuple((name, axes) for name, axes in LOGICAL_AXIS_RULES if name != "layers")


def pipeline_steps(num_layers: int, num_stages: int, schedule: Schedule = "wavefront") -> int:
  """Time steps of the forward (one step = one layer over a stage's chunks): L + P − 1 for the
  wavefront, P·L for the sequential hand-off."""
  return num_layers + num_stages - 1 if schedule == "wavefront" else num_stages * num_layers


def _vary(tree, axes: tuple[str, ...]):
  """`tree` made varying over the manual `axes` (an implicit `pcast` where it is not yet), so the
  transpose sums replicated parameters' cotangents once, here, instead of once per step."""
  return jax.tree.map(lambda x: x + jax.lax.pcast(jnp.zeros((), x.dtype), axes, to="varying"),
                      tree)


def _layer_step(model: CometForCausalLM, chunks: ChunkLayout, axes: tuple[str, ...]):
  """`step(layer, active, h, memory) -> (h, memory)`: layer `layer` (traced index) over the local
  chunks h `[n, B, Lmax, d]` when `active`, else the identity. Rematerialised: only h and the
  memory are saved per step, and each (chunk, layer) cell is rematerialised inside. `axes`: the
  manual axes.

  An idle stage computes the layer too and discards it (`where`, not `cond`): the stages run in
  lockstep, so this costs no time, and collectives that the partitioner puts inside a `cond`
  (fsdp / tensor sharding) deadlock when the stages take different branches.
  """
  params, cell = model.stacked_cells()
  params = _vary(params, axes)

  def over_chunks(layer_params, h, memory):
    def body(memory, inputs):
      x, chunk = inputs
      y, *memory = cell(layer_params, x, *memory, chunk)
      return tuple(memory), y
    memory, h = jax.lax.scan(body, memory, (h, chunks))
    return h, memory

  @jax.checkpoint
  def step(layer, active, h, memory):
    layer_params = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False),
                                params)
    return _where(active, over_chunks(layer_params, h, memory), (h, memory))

  return step


def _where(pred, a, b):
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def _wavefront(step, h, empty, num_layers: int, axis: str):
  """The skewed loop (§10.3): L + P − 1 steps; stage r runs layer t − r at step t."""
  stage, num_stages = jax.lax.axis_index(axis), jax.lax.axis_size(axis)
  forward = [(i, i + 1) for i in range(num_stages - 1)]

  def body(carry, t):
    h, received = carry
    layer = t - stage
    memory = _where(stage == 0, empty, received)        # stage 0 starts every layer afresh
    h, memory = step(jnp.clip(layer, 0, num_layers - 1), (layer >= 0) & (layer < num_layers),
                     h, memory)
    return (h, jax.lax.ppermute(memory, axis, forward)), None

  steps = pipeline_steps(num_layers, num_stages, "wavefront")
  (h, _), _ = jax.lax.scan(body, (h, empty), jnp.arange(steps))
  return h


def _sequential(step, h, empty, num_layers: int, axis: str):
  """Naive hand-off: P phases of L steps; in phase s only stage s runs (all its layers), then the
  L final memories move to stage s + 1."""
  stage, num_stages = jax.lax.axis_index(axis), jax.lax.axis_size(axis)
  forward = [(i, i + 1) for i in range(num_stages - 1)]

  def phase(carry, s):
    def body(h, inputs):
      layer, received = inputs
      return step(layer, stage == s, h, _where(stage == 0, empty, received))

    h, received = carry
    h, produced = jax.lax.scan(body, h, (jnp.arange(num_layers), received))
    return (h, jax.lax.ppermute(produced, axis, forward)), None

  stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_layers, *a.shape)), empty)
  (h, _), _ = jax.lax.scan(phase, (h, stacked), jnp.arange(num_stages))
  return h


def stage_loss_sums(model: CometForCausalLM, h, chunks: ChunkLayout, *,
                    schedule: Schedule = "wavefront", stage_axis: str = STAGE,
                    data_axes: tuple[str, ...] = (DATA,)):
  """Per-device body, inside `shard_map` (manual over `stage_axis` and `data_axes`).

  Args:
    model: the whole model (replicated over the manual axes). h: `[b, n, Lmax, d]` embedded
      local chunks, n = N/P consecutive chunks of this device's b rows; chunks: their uniform
      `ChunkLayout [b, n, ...]`.

  Returns:
    (loss_sum, label_count) psummed over `(*data_axes, stage_axis)` (final norm, head and CE
    chunk by chunk on the local labels), and the last-layer hidden states `[b, n, Lmax, d]` of
    the local chunks.
  """
  h, chunks = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), (h, chunks))     # [n, b, ...]
  axes = (*data_axes, stage_axis)
  empty = jax.tree.map(lambda a: jax.lax.pcast(a[0], axes, to="varying"),   # carries vary like h
                       model.init_memory(h.shape[1]))
  run = {"wavefront": _wavefront, "sequential": _sequential}[schedule]
  h = run(_layer_step(model, chunks, axes), h, empty, model.backbone.config.n_layers,
          stage_axis)

  @jax.checkpoint                           # one chunk's logits `[b, Lmax, V]` alive at a time
  def chunk_loss_sums(inputs):
    x, labels = inputs
    return token_loss_sums(model.backbone._logits(x), labels)

  sums = jax.tree.map(jnp.sum, jax.lax.map(chunk_loss_sums, (h, chunks.labels)))
  return jax.lax.psum(sums, axes), jnp.moveaxis(h, 0, 1)


def comet_pipeline(model: CometForCausalLM, layout: ChunkLayout, mesh: Mesh, *,
                   schedule: Schedule = "wavefront"):
  """Runs `model` over a uniform layout `[B, N, ...]` with chunks split over `mesh`'s 'stage'
  axis (N % P == 0) and rows over 'data'. Call inside `jax.jit`.

  The embedding lookup runs before `shard_map` (automatic sharding): XLA's SPMD partitioner
  aborts on a gather from a table sharded over two automatic axes (fsdp × tensor) inside a
  partially manual computation (jax 0.11.2 and 0.12).

  Returns:
    ((loss_sum, label_count) over the whole batch, last-layer hidden states `[B, N, Lmax, d]`).
  """
  if not isinstance(layout, ChunkLayout):
    raise ValueError("comet_pipeline needs a uniform ChunkLayout [B, N, ...] (layout='uniform')")
  if schedule not in ("wavefront", "sequential"):
    raise ValueError(f"schedule must be 'wavefront' or 'sequential', got {schedule!r}")
  batch, n_chunks = layout.n_valid.shape
  stages, rows = mesh.shape[STAGE], mesh.shape.get(DATA, 1)
  if n_chunks % stages or batch % rows:
    raise ValueError(f"{n_chunks} chunks × {batch} rows do not split over {stages} stages × "
                     f"{rows} data shards")
  data_axes = (DATA,) if DATA in mesh.shape else ()
  graphdef, state = nnx.split(model)

  def body(state, h, chunks):
    return stage_loss_sums(nnx.merge(graphdef, state), h, chunks, schedule=schedule,
                           data_axes=data_axes)

  chunked = PartitionSpec(data_axes or None, STAGE)
  h = model.backbone._embed(jnp.asarray(layout.input_ids))                  # [B, N, Lmax, d]
  return jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(), chunked, chunked),
                       out_specs=(PartitionSpec(), chunked),
                       axis_names={*data_axes, STAGE})(state, h, layout)


def comet_pipeline_loss(model: CometForCausalLM, layout: ChunkLayout, mesh: Mesh, *,
                        schedule: Schedule = "wavefront"):
  """Mean CE over every labelled token of the batch (spec §7.3), pipelined (`comet_pipeline`)."""
  (total, count), _ = comet_pipeline(model, layout, mesh, schedule=schedule)
  return total / jnp.maximum(count, 1)

"""CoMeT forward pass (spec §7): the (chunk, layer) cell, chunk-/layer-major scans, logits and loss.

`CometForCausalLM` wraps a `Qwen3ForCausalLM` backbone and per-layer memory nets stacked on the
same leading [L] axis as the backbone blocks, so both scan together. Every chunk is laid out on
the host (`layout.py`) with the uniform template of length Lmax; chunks are scanned.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.models.comet.config import CometConfig
from dlax.models.comet.layout import IGNORE_LABEL, ChunkLayout, build_batch
from dlax.models.comet.memory import (LayerMemory, inject_memory, memory_nets,
                                      update_memory_from_layout)
from dlax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

Order = Literal["chunk", "layer"]


class MemoryNets(nnx.Module):
  """One layer's memory plug-in: `global_net` / `temp_net` (None when that path is off)."""

  def __init__(self, dim: int, config: CometConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.global_net, self.temp_net = memory_nets(dim, config, dtype=dtype,
                                                 param_dtype=param_dtype, rngs=rngs)


def comet_cell(block, nets: MemoryNets, x, memory: LayerMemory, M, chunk: ChunkLayout):
  """One (chunk τ, layer l) cell (§7.2): inject memory, run the layer, update memory.

  Args:
    block: the backbone layer (`Block`). nets: that layer's `MemoryNets`.
    x: `[B, L, d]` hidden states of chunk τ entering layer l. memory: layer l's carried state.
    M: `[B, G, d]` = RLA_g(S). chunk: chunk τ's `ChunkLayout` `[B, ...]`.

  Returns:
    (y `[B, L, d]`, new memory, new M). Positions are the slot indices 0..L−1 (the layout's
    positions on valid tokens; padding is masked), keys are limited to `max(n_valid, 1)`.
  """
  x = inject_memory(x, memory, M, chunk.gslot_idx, chunk.tslot_idx)
  kv_mask = jnp.arange(x.shape[1]) < jnp.maximum(chunk.n_valid, 1)[:, None]
  y, _ = block(x, kv_mask=kv_mask)
  memory, M = update_memory_from_layout(y, memory, nets.global_net, nets.temp_net, chunk)
  return y, memory, M.astype(memory.S.dtype)


def token_loss_sums(logits, labels):
  """logits `[..., V]`, labels `[...]` (−100 = ignored) → (Σ CE over labelled tokens, count)."""
  mask = labels != IGNORE_LABEL
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  nll = -jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], -1)[..., 0]
  return jnp.sum(jnp.where(mask, nll, 0)), jnp.sum(mask)


class CometForCausalLM(nnx.Module):
  """Qwen3 backbone (`backbone`) + per-layer memory nets (`memory_nets`, stacked on [L])."""

  def __init__(self, backbone_config: Qwen3Config, config: CometConfig, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    self.backbone = Qwen3ForCausalLM(backbone_config, rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype)
    dim, n_layers = backbone_config.hidden_size, backbone_config.num_hidden_layers

    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_nets(rngs):
      return MemoryNets(dim, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    self.memory_nets = make_nets(rngs)

  @property
  def state_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.config.state_dtype or self.backbone.config.compute_dtype)

  def init_memory(self, batch: int) -> tuple[LayerMemory, jax.Array]:
    """Empty (memory, M) for `batch` sequences, stacked on a leading [L] axis."""
    c, n_layers = self.config, self.backbone.config.n_layers
    memory = LayerMemory.empty(batch, c.global_mem_size, c.temp_capacity,
                               self.backbone.config.d_model, self.state_dtype)
    stack = lambda a: jnp.broadcast_to(a, (n_layers, *a.shape))
    return jax.tree.map(stack, memory), stack(memory.S)

  def layout(self, input_ids, labels=None) -> ChunkLayout:
    """Host-side fixed-plan uniform layout `[B, N_chunks, ...]` of input_ids `[B, T]` (concrete)."""
    ids = np.asarray(input_ids)
    rows = [None] * len(ids) if labels is None else np.asarray(labels)
    return build_batch([(i, y, None) for i, y in zip(ids, rows)], self.config, layout="uniform")

  def forward_chunks(self, layout: ChunkLayout, *, order: Order = "chunk"):
    """layout `[B, N, ...]` (uniform, length L) → (logits `[B, N, L, V]`, final (memory, M)).

    `order="chunk"` scans chunks outside and layers inside; `"layer"` the reverse. Each cell is
    rematerialised; both orders give the same results (§7.2, dependency grid).
    """
    chunks = jax.tree.map(lambda a: jnp.moveaxis(jnp.asarray(a), 1, 0), layout)  # [N, B, ...]
    x = self.backbone._embed(chunks.input_ids)                                   # [N, B, L, d]
    state = self.init_memory(x.shape[1])
    graphdef, params = nnx.split((self.backbone.blocks, self.memory_nets))

    @jax.checkpoint
    def cell(layer_params, x, memory, M, chunk):
      block, nets = nnx.merge(graphdef, layer_params)
      return comet_cell(block, nets, x, memory, M, chunk)

    if order == "chunk":
      def over_chunks(state, inputs):
        x, chunk = inputs

        def over_layers(x, layer):
          layer_params, memory, M = layer
          x, memory, M = cell(layer_params, x, memory, M, chunk)
          return x, (memory, M)

        y, state = jax.lax.scan(over_layers, x, (params, *state))
        return state, y

      state, y = jax.lax.scan(over_chunks, state, (x, chunks))
    elif order == "layer":
      def over_chunks(layer_params, carry, inputs):
        x, chunk = inputs
        y, memory, M = cell(layer_params, x, *carry, chunk)
        return (memory, M), y

      def over_layers(x, layer):
        layer_params, memory, M = layer
        state, y = jax.lax.scan(lambda c, i: over_chunks(layer_params, c, i), (memory, M),
                                (x, chunks))
        return y, state

      y, state = jax.lax.scan(over_layers, x, (params, *state))
    else:
      raise ValueError(f"order must be 'chunk' or 'layer', got {order!r}")
    n, b, length, d = y.shape
    logits = self.backbone._logits(y.reshape(n * b, length, d)).reshape(n, b, length, -1)
    return jnp.moveaxis(logits, 0, 1), state

  def __call__(self, input_ids, *, order: Order = "chunk"):
    """input_ids `[B, T]` (concrete, fixed plan) → logits `[B, T, V]` in text order."""
    self.backbone._check_tokens(jnp.asarray(input_ids), rank=2)
    layout = self.layout(input_ids)
    logits, _ = _jit_forward_chunks(self, layout, order)
    text = jnp.take_along_axis(logits, jnp.asarray(layout.text_idx)[..., None], axis=2,
                               mode="fill", fill_value=0)                        # [B, N, C, V]
    b, n, c, v = text.shape
    return text.reshape(b, n * c, v)[:, :np.shape(input_ids)[1]]

  def loss(self, input_ids, labels=None, *, order: Order = "chunk"):
    """Mean CE over labelled tokens (§7.3); labels `[B, T]` raw (shifted by the layout), None =
    every next token."""
    layout = self.layout(input_ids, labels)
    logits, _ = _jit_forward_chunks(self, layout, order)
    total, count = token_loss_sums(logits, jnp.asarray(layout.labels))
    return total / jnp.maximum(count, 1)


@nnx.jit(static_argnames="order")
def _jit_forward_chunks(model: CometForCausalLM, layout: ChunkLayout, order: Order):
  return model.forward_chunks(layout, order=order)

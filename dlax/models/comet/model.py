"""CoMeT forward pass (spec §7): the (chunk, layer) cell, chunk-/layer-major scans, logits and loss.

`CometForCausalLM` wraps a `Qwen3ForCausalLM` backbone and per-layer memory nets stacked on the
same leading [L] axis as the backbone blocks, so both scan together. Chunks are laid out on the
host (`layout.py`), either with the uniform template (every chunk Lmax long, `ChunkLayout
[B, N, ...]`, chunks scanned) or exactly (`list` over chunks of `ChunkLayout [B, ...]` of length
`exact_lengths(config)[τ]`, the chunk loop unrolled in Python: one static shape per index, §6.3).
"""

from __future__ import annotations

from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.models.comet.config import CometConfig
from dlax.models.comet.layout import (IGNORE_LABEL, ChunkLayout, build_batch, fixed_plan,
                                      text_order_index, text_order_labels, validate_plan)
from dlax.models.comet.memory import (LayerMemory, inject_memory, memory_nets,
                                      update_memory_from_layout)
from dlax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

Order = Literal["chunk", "layer"]
Layout = ChunkLayout | list[ChunkLayout]   # uniform [B, N, ...] or exact: per chunk [B, ...]


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
    positions on valid tokens; padding is masked), keys are limited to `max(n_valid, 1)`. The
    official FIFO's pad compression tokens (after n_valid, read but never attended) therefore run
    at their index n_valid + j, not at the layout's padding position n_valid: the backbone's
    attention derives positions from the index (the reference's positions are unverified).
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


def _over_chunks(step, carry, xs, chunks: Layout):
  """`step(carry, (x, chunk)) -> (carry, y)` over the chunks in order: `lax.scan` over stacked
  `[N, ...]` inputs (uniform), or a Python loop over lists (exact, one static shape per chunk)."""
  if isinstance(chunks, ChunkLayout):
    return jax.lax.scan(step, carry, (xs, chunks))
  ys = []
  for x, chunk in zip(xs, chunks):
    carry, y = step(carry, (x, chunk))
    ys.append(y)
  return carry, ys


def _row_lengths(input_ids: np.ndarray, attention_mask) -> np.ndarray:
  """`[B]` tokens per row: T, or the sum of a right-padding mask `[B, T]` (1…1 0…0)."""
  if attention_mask is None:
    return np.full(len(input_ids), input_ids.shape[1])
  if isinstance(attention_mask, jax.core.Tracer):
    raise ValueError("attention_mask must be concrete: the layout is built on the host")
  mask = np.asarray(attention_mask)
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} must equal input_ids shape "
                     f"{input_ids.shape}")
  if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"attention_mask must be bool or integer, got dtype {mask.dtype}")
  if not np.isin(mask, (0, 1)).all():
    raise ValueError("attention_mask must hold only 0 and 1")
  lengths = mask.sum(1)
  bad = np.flatnonzero(np.any(mask.astype(bool) != (np.arange(mask.shape[1]) < lengths[:, None]),
                              axis=1))
  if bad.size:
    raise ValueError(f"attention_mask must be right padding (1…1 0…0) in every row; rows "
                     f"{bad.tolist()} are not")
  return lengths


def _check_labels(labels, input_ids: np.ndarray, vocab: int) -> np.ndarray | None:
  """Raw labels `[B, T]`: ints in [0, vocab) or −100."""
  if labels is None:
    return None
  labels = np.asarray(labels)
  if labels.shape != input_ids.shape or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be an integer array of shape {input_ids.shape}, got "
                     f"{labels.dtype} {labels.shape}")
  if np.any((labels != IGNORE_LABEL) & ((labels < 0) | (labels >= vocab))):
    raise ValueError(f"labels must lie in [0, {vocab}) or be {IGNORE_LABEL}")
  return labels


def _check_plans(plans, lengths: np.ndarray, chunk_size: int) -> list[np.ndarray]:
  """Per-row chunk plans, each summing to its row's length with sizes in [0, C]; None: fixed-size
  chunks, remainder last."""
  if plans is None:
    return [fixed_plan(int(n), chunk_size) for n in lengths]
  if isinstance(plans, np.ndarray):
    plans = list(plans)
  if not isinstance(plans, Sequence) or len(plans) != len(lengths):
    raise ValueError(f"plans must be a list of {len(lengths)} per-row chunk plans, got {plans!r}")
  checked = []
  for row, (plan, n_tokens) in enumerate(zip(plans, lengths)):
    try:
      checked.append(validate_plan(plan, chunk_size, n_tokens=int(n_tokens)))
    except ValueError as error:
      raise ValueError(f"plans[{row}]: {error}") from None
  return checked


class CometForCausalLM(nnx.Module):
  """Qwen3 backbone (`backbone`) + per-layer memory nets (`memory_nets`, stacked on [L]).

  `dtype` is the compute dtype, `param_dtype` the storage dtype; `attention_impl` picks the
  backbone's attention (None: einsum; "xla" / "cudnn": `jax.nn.dot_product_attention`).
  """

  def __init__(self, backbone_config: Qwen3Config, config: CometConfig, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str | None = None):
    self.config = config
    self.backbone = Qwen3ForCausalLM(backbone_config, rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype, attention_impl=attention_impl)
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
                               self.backbone.config.d_model, self.state_dtype,
                               fifo_mode=c.fifo_mode)
    stack = lambda a: jnp.broadcast_to(a, (n_layers, *a.shape))
    return jax.tree.map(stack, memory), stack(memory.S)

  def layout(self, input_ids, labels=None, *, attention_mask=None, plans=None,
             layout: str | None = None) -> Layout:
    """Host-side layout of input_ids `[B, T]` (concrete), validated.

    labels: raw `[B, T]` (None: every next token). attention_mask: `[B, T]` right padding.
    plans: per-row chunk sizes (None: fixed size, remainder last); rows are padded with empty
    chunks to the longest plan. layout: "uniform" → ChunkLayout `[B, N, ...]`, "exact" → list of
    ChunkLayout `[B, ...]` (default: `config.layout`).
    """
    if isinstance(input_ids, jax.core.Tracer):
      raise ValueError("input_ids must be concrete: the layout is built on the host")
    ids = np.asarray(input_ids)
    self.backbone._check_tokens(ids, rank=2)
    lengths = _row_lengths(ids, attention_mask)
    labels = _check_labels(labels, ids, self.backbone.config.vocab_size)
    plans = _check_plans(plans, lengths, self.config.chunk_size)
    examples = [(ids[b, :n], None if labels is None else labels[b, :n], plan)
                for b, (n, plan) in enumerate(zip(lengths, plans))]
    n_chunks = max(1, *map(len, plans))           # at least one (then empty) chunk
    return build_batch(examples, self.config, n_chunks=n_chunks, layout=layout)

  def stacked_cells(self, *, remat: bool = True):
    """(params, cell): the per-layer parameters (backbone block + memory nets) stacked on [L], and
    `cell(layer_params, x, memory, M, chunk) -> (y, memory, M)` running `comet_cell` on one
    layer's slice of them (under `jax.checkpoint` when `remat`). Scans over layers feed it."""
    graphdef, params = nnx.split((self.backbone.blocks, self.memory_nets))

    def cell(layer_params, x, memory, M, chunk):
      block, nets = nnx.merge(graphdef, layer_params)
      return comet_cell(block, nets, x, memory, M, chunk)

    return params, (jax.checkpoint(cell) if remat else cell)

  def _forward_hidden(self, layout: Layout, order: Order):
    """Last-layer hidden states (`[N, B, L, d]` uniform, list of `[B, L_τ, d]` exact) and the
    final (memory, M). Both orders share the rematerialised cell and `_over_chunks`."""
    if isinstance(layout, ChunkLayout):
      chunks = jax.tree.map(lambda a: jnp.moveaxis(jnp.asarray(a), 1, 0), layout)  # [N, B, ...]
      xs = self.backbone._embed(chunks.input_ids)                                # [N, B, L, d]
      batch = xs.shape[1]
    else:
      chunks = [jax.tree.map(jnp.asarray, chunk) for chunk in layout]
      xs = [self.backbone._embed(chunk.input_ids) for chunk in chunks]           # [B, L_τ, d]
      batch = xs[0].shape[0]
    state = self.init_memory(batch)
    params, cell = self.stacked_cells()

    if order == "chunk":
      def chunk_step(state, inputs):
        x, chunk = inputs

        def layer_step(x, layer):
          layer_params, memory, M = layer
          x, memory, M = cell(layer_params, x, memory, M, chunk)
          return x, (memory, M)

        y, state = jax.lax.scan(layer_step, x, (params, *state))
        return state, y

      state, ys = _over_chunks(chunk_step, state, xs, chunks)
    elif order == "layer":
      def layer_step(xs, layer):
        layer_params, memory, M = layer

        def chunk_step(carry, inputs):
          x, chunk = inputs
          y, memory, M = cell(layer_params, x, *carry, chunk)
          return (memory, M), y

        state, ys = _over_chunks(chunk_step, (memory, M), xs, chunks)
        return ys, state

      ys, state = jax.lax.scan(layer_step, xs, (params, *state))
    else:
      raise ValueError(f"order must be 'chunk' or 'layer', got {order!r}")
    return ys, state

  def forward_chunks(self, layout: Layout, *, order: Order = "chunk"):
    """Uniform layout `[B, N, ...]` → (logits `[B, N, L, V]`, final (memory, M)); exact list of
    ChunkLayout `[B, ...]` → (list of logits `[B, L_τ, V]`, final (memory, M)).

    `order="chunk"` runs chunks outside and layers inside; `"layer"` the reverse. Each cell is
    rematerialised; both orders and both layouts give the same results (§7.2, dependency grid).
    """
    ys, state = self._forward_hidden(layout, order)
    if isinstance(layout, ChunkLayout):
      n, b, length, d = ys.shape
      logits = self.backbone._logits(ys.reshape(n * b, length, d)).reshape(n, b, length, -1)
      return jnp.moveaxis(logits, 0, 1), state
    return [self.backbone._logits(y) for y in ys], state

  def __call__(self, input_ids, attention_mask=None, plans=None, *, order: Order = "chunk",
               layout: str | None = None):
    """Logits `[B, T, V]` of every input text token, in text order; 0 at padded positions.

    input_ids `[B, T]` int, concrete (the memory/beacon layout is built on the host, then the
    forward runs jitted). attention_mask `[B, T]`: 1 = token, 0 = right padding. plans: per-row
    chunk sizes, each summing to its row's length with sizes ≤ C (default: fixed-size chunks,
    remainder last). layout: "uniform" | "exact" (default `config.layout`). Bad inputs raise
    ValueError.
    """
    return self._text_logits(input_ids, None, attention_mask, plans, order, layout)[0]

  def loss(self, input_ids, labels=None, attention_mask=None, plans=None, *,
           order: Order = "chunk", layout: str | None = None):
    """Mean CE over labelled tokens (§7.3). labels `[B, T]` raw: shifted (y_i = label_{i+1})
    before chunking, −100 ignored, None = every next token; padded positions are ignored. Other
    arguments as in `__call__`."""
    logits, labels = self._text_logits(input_ids, labels, attention_mask, plans, order, layout)
    total, count = token_loss_sums(logits, jnp.asarray(labels))
    return total / jnp.maximum(count, 1)

  def generate(self, prompt_ids, max_new_tokens: int, **kwargs):
    """Streaming prefill, then decoding on a KV cache over the final chunk (§8); see
    `dlax.models.comet.generation.generate` for the arguments."""
    from dlax.models.comet.generation import generate
    return generate(self, prompt_ids, max_new_tokens, **kwargs)

  @classmethod
  def from_pretrained(cls, path, config: CometConfig | None = None, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, mesh=None, seed: int = 0,
                      attention_impl: str | None = None) -> CometForCausalLM:
    """Loads an official CoMeT folder or a plain HF Qwen3 folder (memory initialised per §4,
    embedding resized per §3); see `dlax.models.comet.checkpoint.load_comet`."""
    from dlax.models.comet.checkpoint import load_comet
    return load_comet(path, config, dtype=dtype, param_dtype=param_dtype, mesh=mesh, seed=seed,
                      attention_impl=attention_impl)

  def save_pretrained(self, path, *, format: str = "official", dtype: str = "float32",
                      max_shard_size=None) -> None:
    """Writes the official CoMeT layout (§12) or, with `format="hf-backbone"`, a plain HF Qwen3
    folder of the backbone; see `dlax.models.comet.checkpoint.save_comet`."""
    from dlax.models.comet.checkpoint import save_comet
    save_comet(self, path, format=format, dtype=dtype, max_shard_size=max_shard_size)

  def _text_logits(self, input_ids, labels, attention_mask, plans, order, layout):
    """Host layout, jitted forward, lm head at the text tokens only → (logits `[B, T, V]`, shifted
    labels `[B, T]`), both in text order (0 / −100 at padding)."""
    chunks = self.layout(input_ids, labels, attention_mask=attention_mask, plans=plans,
                         layout=layout)
    index = text_order_index(chunks, np.shape(input_ids)[1])
    logits = _jit_text_logits(self, _jit_hidden(self, chunks, order), index)
    return logits, text_order_labels(chunks, index)


@nnx.jit(static_argnames="order")
def _jit_hidden(model: CometForCausalLM, layout: Layout, order: Order):
  """Last-layer hidden states with the chunks' token axes laid end to end: `[B, Σ L_τ, d]`."""
  ys, _ = model._forward_hidden(layout, order)
  if isinstance(layout, ChunkLayout):
    n, b, length, d = ys.shape
    return jnp.moveaxis(ys, 0, 1).reshape(b, n * length, d)
  return jnp.concatenate(ys, axis=1)


@nnx.jit
def _jit_text_logits(model: CometForCausalLM, hidden, index):
  """hidden `[B, K, d]`, index `[B, T]` (−1: padding) → logits `[B, T, V]`, 0 at padding."""
  x = jnp.take_along_axis(hidden, jnp.maximum(index, 0)[..., None], axis=1)
  logits = model.backbone._logits(x)
  return jnp.where((index >= 0)[..., None], logits, 0)

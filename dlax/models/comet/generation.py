"""CoMeT generation (spec §8): streaming prefill, a KV cache over the final chunk, beacon insertion.

A prompt is laid out with the fixed plan of §8.1 (the final chunk has no readouts and no trailing
`<beacon>`). Prefill runs every non-final chunk through all layers, one jitted chunk at a time,
keeping only the per-layer memory, so device memory does not grow with the prompt. The final chunk
then runs once more with its keys and values kept: the KV cache holds only that chunk plus the
generated tokens. Decoding is plain Qwen3 on that cache; memory is never updated.

Batches mix prompt lengths: shorter prompts get trailing empty chunks before their final chunk
(empty chunks change no memory), and every row keeps its own position and beacon counter.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.layers.attention import KVCache
from dlax.models.comet.layout import (ChunkLayout, build_layout, build_prompt_layout,
                                      concat_chunks, stack_chunks, take_chunks, truncate_chunks)
from dlax.models.comet.memory import inject_memory
from dlax.models.sampling import check_sampling, eos_tuple, sample_tokens


class PromptBatch(NamedTuple):
  """Host-side layout of a batch of prompts (§8.1).

  prefix: ChunkLayout `[B, N−1, Lmax]`, the non-final chunks (rows with fewer chunks end with
    empty ones). final: ChunkLayout `[B, Lf]`, the final chunks cut to Lf = max n_valid.
  initial_count: `[B]` the beacon counter `cnt` of §8.4 after the prompt.
  """
  prefix: ChunkLayout
  final: ChunkLayout
  initial_count: np.ndarray


class GenerationResult(NamedTuple):
  """tokens: `[B, max_new]` generated text (pad after a row's end); num_tokens: `[B]`.

  fed: `[B, F]` every token fed to the decoder after the prompt, beacons included (pad after
  num_fed). cache_length: the KV cache length `Lcache` (§8.2). final_n_valid: `[B]` the final
  chunk's valid length, where decoding positions start.
  """
  tokens: np.ndarray
  num_tokens: np.ndarray
  fed: np.ndarray
  num_fed: np.ndarray
  cache_length: int
  final_n_valid: np.ndarray


def layout_prompts(prompts: Sequence[np.ndarray], config) -> PromptBatch:
  """Lays out each prompt (a 1-D int array, at least one token) and aligns the final chunks."""
  rows = [build_prompt_layout(p, config) for p in prompts]
  n_prefix = max(len(r.n_valid) for r in rows) - 1
  g = config.global_mem_size
  prefixes, finals, counts = [], [], []
  for row in rows:
    prefix = take_chunks(row, slice(0, -1))
    missing = n_prefix - len(prefix.n_valid)
    if missing:
      empty = build_layout(np.zeros(0, np.int32), None, np.zeros(missing, np.int32), config)
      prefix = concat_chunks([prefix, empty])
    final = take_chunks(row, -1)
    count = int(final.n_text)
    if config.generation_layout == "official":   # §8.4: counts the memory placeholders too
      count += g * int(final.has_global) + int(final.n_temp)
    prefixes.append(prefix)
    finals.append(final)
    counts.append(count)
  final = stack_chunks(finals)
  return PromptBatch(stack_chunks(prefixes), truncate_chunks(final, int(final.n_valid.max())),
                     np.asarray(counts, np.int32))


# ----------------------------------------------------------------------------- device steps

@nnx.jit(donate_argnums=1)
def advance_memory(model, state, chunk: ChunkLayout):
  """One prefill chunk through all layers: state (memory, M) stacked on [L] → updated state."""
  params, cell = model.stacked_cells(remat=False)

  def layer(x, inputs):
    layer_params, memory, M = inputs
    y, memory, M = cell(layer_params, x, memory, M, chunk)
    return y, (memory, M)

  _, state = jax.lax.scan(layer, model.backbone._embed(chunk.input_ids), (params, *state))
  return state


@nnx.jit(static_argnames="cache_length")
def prefill_final_chunk(model, state, final: ChunkLayout, cache_length: int):
  """Final prompt chunk with memory injected → (logits `[B, V]` at its last token, stacked KV
  cache `[L, B, cache_length, KV, hd]`). Its padding lies after every valid query, so plain
  causal attention needs no key mask; decoding overwrites the padded cache rows before use."""
  graphdef, params = nnx.split(model.backbone.blocks)
  pad = cache_length - final.input_ids.shape[1]

  def layer(x, inputs):
    layer_params, memory, M = inputs
    block = nnx.merge(graphdef, layer_params)
    x = inject_memory(x, memory, M, final.gslot_idx, final.tslot_idx)
    y, kv = block(x)
    grow = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return y, KVCache(grow(kv.k), grow(kv.v))

  y, cache = jax.lax.scan(layer, model.backbone._embed(final.input_ids), (params, *state))
  last = jnp.take_along_axis(y, (final.n_valid - 1)[:, None, None], axis=1)    # [B, 1, d]
  return model.backbone._logits(last)[:, 0], cache


def decode_step(model, cache: KVCache, tokens, positions):
  """tokens `[B]` at per-row positions `[B]` → (logits `[B, V]`, cache with them written)."""
  graphdef, params = nnx.split(model.backbone.blocks)

  def layer(x, inputs):
    layer_params, layer_cache = inputs
    return nnx.merge(graphdef, layer_params)(x, cache=layer_cache, pos=positions)

  x, cache = jax.lax.scan(layer, model.backbone._embed(tokens[:, None]), (params, cache))
  return model.backbone._logits(x)[:, 0], cache


class _Decoding(NamedTuple):
  cache: KVCache
  positions: jax.Array    # [B] next cache row / RoPE position
  count: jax.Array        # [B] beacon counter cnt (§8.4)
  logits: jax.Array       # [B, V] of the last fed text token
  pending: jax.Array      # [B] text token waiting behind a just-fed <beacon>, −1 if none
  tokens: jax.Array       # [B, max_new]
  num_tokens: jax.Array   # [B]
  fed: jax.Array          # [B, F]
  num_fed: jax.Array      # [B]
  done: jax.Array         # [B]
  step: jax.Array         # scalar


@nnx.jit(static_argnames=("max_new", "max_fed", "stride", "beacon_id", "eos_ids", "temperature",
                          "top_p", "pad_id"))
def decode_loop(model, cache, positions, count, logits, key, *, max_new: int, max_fed: int,
                stride: int, beacon_id: int, eos_ids: tuple[int, ...], temperature: float,
                top_p: float, pad_id: int) -> _Decoding:
  """§8.3–8.4 for every row until it has `max_new` tokens or an eos.

  Each iteration feeds one token per unfinished row: the text token waiting behind a `<beacon>`,
  or a newly sampled one x — preceded by `<beacon>` (its logits discarded) when `cnt % s == 0`.
  """
  b = positions.shape[0]
  rows = jnp.arange(b)
  state = _Decoding(cache, positions, count, logits, jnp.full((b,), -1, jnp.int32),
                    jnp.full((b, max_new), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32),
                    jnp.full((b, max_fed), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32),
                    jnp.zeros((b,), bool), jnp.zeros((), jnp.int32))

  def body(s: _Decoding) -> _Decoding:
    sampling = (s.pending < 0) & ~s.done
    x = sample_tokens(s.logits, jax.random.fold_in(key, s.step), temperature=temperature,
                      top_p=top_p)
    tokens = s.tokens.at[rows, jnp.where(sampling, s.num_tokens, max_new)].set(x, mode="drop")
    num_tokens = s.num_tokens + sampling
    is_eos = jnp.isin(x, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else False
    ended = sampling & ((num_tokens == max_new) | is_eos)
    done = s.done | ended
    beacon = sampling & (stride > 0) & (s.count % max(stride, 1) == 0)
    feed = jnp.where(s.pending >= 0, s.pending, jnp.where(beacon, beacon_id, x))
    feeding = ~done
    new_logits, cache = decode_step(model, s.cache, jnp.where(feeding, feed, pad_id),
                                    s.positions)
    text = feeding & ~beacon
    fed = s.fed.at[rows, jnp.where(feeding, s.num_fed, max_fed)].set(feed, mode="drop")
    return _Decoding(cache, s.positions + feeding, s.count + text,
                     jnp.where(text[:, None], new_logits, s.logits),
                     jnp.where(feeding & beacon, x, -1), tokens, num_tokens, fed,
                     s.num_fed + feeding, done, s.step + 1)

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.step < max_fed + max_new), body,
                            state)


# ------------------------------------------------------------------------------------- API

def _prompt_rows(prompts, attention_mask, vocab_size: int) -> list[np.ndarray]:
  """A list of 1-D prompts, or `[B, T]` ids with a contiguous (left- or right-padded) mask."""
  if isinstance(prompts, (list, tuple)) and attention_mask is None:
    rows = [np.asarray(p) for p in prompts]
  else:
    ids = np.asarray(prompts)
    if ids.ndim != 2:
      raise ValueError(f"prompt_ids must be [B, T] or a list of 1-D prompts, got shape "
                       f"{ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
      raise ValueError(f"attention_mask shape {mask.shape} must equal prompt shape {ids.shape}")
    rows = []
    for r, (row, m) in enumerate(zip(ids, mask.astype(bool))):
      kept = np.flatnonzero(m)
      if kept.size and kept[-1] - kept[0] + 1 != kept.size:
        raise ValueError(f"attention_mask row {r} is not one contiguous run of ones")
      rows.append(row[kept])
  if not rows:
    raise ValueError("generate needs at least one prompt")
  for r, row in enumerate(rows):
    if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt {r} must be a non-empty 1-D integer sequence, got dtype "
                       f"{row.dtype} shape {row.shape}")
    if row.min() < 0 or row.max() >= vocab_size:
      raise ValueError(f"prompt {r}: token ids must lie in [0, {vocab_size}), got ids in "
                       f"[{row.min()}, {row.max()}]")
  return [row.astype(np.int32) for row in rows]


def streaming_prefill(model, prefix: ChunkLayout):
  """Runs the non-final chunks `[B, N−1, ...]` one at a time → per-layer (memory, M)."""
  state = model.init_memory(prefix.input_ids.shape[0])
  for tau in range(prefix.input_ids.shape[1]):
    state = advance_memory(model, state, ChunkLayout(*(jnp.asarray(a[:, tau]) for a in prefix)))
  return state


def _beacon_stride(config) -> int:
  """s, or 0 when the temporary path (and with it beacon insertion) is off."""
  return config.temp_beacon_stride if config.use_temp else 0


def prefill(model, prompts: Sequence[np.ndarray], max_new_tokens: int):
  """Streaming prefill (§8.2) of 1-D prompts → (logits `[B, V]` of each last prompt token, KV
  cache `[L, B, Lcache, KV, hd]`, the `PromptBatch`), Lcache = max n_valid(final) + max_new +
  ceil(max_new/s) + 1."""
  config = model.config
  batch = layout_prompts(prompts, config)
  stride = _beacon_stride(config)
  max_fed = max_new_tokens + (math.ceil(max_new_tokens / stride) + 1 if stride else 0)
  state = streaming_prefill(model, batch.prefix)
  final = ChunkLayout(*map(jnp.asarray, batch.final))
  logits, cache = prefill_final_chunk(model, state, final, int(final.n_valid.max()) + max_fed)
  return logits, cache, batch


def generate(model, prompt_ids, max_new_tokens: int, *, attention_mask=None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             return_details: bool = False):
  """Generates up to `max_new_tokens` per prompt (§8); greedy when temperature == 0.

  Args:
    model: a `CometForCausalLM`. prompt_ids: a list of 1-D int prompts, or `[B, T]` ids with an
      optional `attention_mask` (one contiguous run of ones per row: left or right padding).
    eos_token_id: stops a row when sampled (kept in its output). pad_token_id: fills finished
      rows (default: the eos id, else 0).

  Returns:
    `[B, max_new_tokens]` int32 numpy ids (beacons stripped), or a `GenerationResult` when
    `return_details`.
  """
  check_sampling(max_new_tokens, temperature, top_p)
  config = model.config
  rows = _prompt_rows(prompt_ids, attention_mask, model.backbone.config.vocab_size)
  eos_ids = eos_tuple(eos_token_id)
  pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
  logits, cache, batch = prefill(model, rows, max_new_tokens)
  stride = _beacon_stride(config)
  max_fed = cache.k.shape[2] - int(batch.final.n_valid.max())
  final_n_valid = jnp.asarray(batch.final.n_valid)
  out = decode_loop(model, cache, final_n_valid, jnp.asarray(batch.initial_count), logits,
                    jax.random.key(seed), max_new=max_new_tokens, max_fed=max_fed,
                    stride=stride, beacon_id=config.temp_beacon_id, eos_ids=eos_ids,
                    temperature=float(temperature), top_p=float(top_p), pad_id=pad_id)
  tokens = np.asarray(out.tokens)
  if not return_details:
    return tokens
  return GenerationResult(tokens, np.asarray(out.num_tokens), np.asarray(out.fed),
                          np.asarray(out.num_fed), cache.k.shape[2],
                          np.asarray(batch.final.n_valid))

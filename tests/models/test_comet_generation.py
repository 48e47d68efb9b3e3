"""CoMeT generation (spec §8) vs §15.12: streaming prefill, final-chunk KV cache, beacon insertion,
greedy decoding against a reference that rebuilds the final chunk every step; float64 tiny model."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from comet_reference import random_tokens, tiny_model
from dlax.models.comet import build_layout, build_prompt_layout
from dlax.models.comet.generation import (generate, layout_prompts, prefill_final_chunk,
                                          sample_tokens, streaming_prefill)


def _prompts(rng, lengths):
  return [random_tokens(rng, n) for n in lengths]


@nnx.jit
def _one_shot(model, layout):
  return model.forward_chunks(layout)


REFERENCE_LENGTH = 64     # the rebuilt sequence is padded to this (causal: padding is unseen)


@nnx.jit
def _final_chunk_logits(model, tokens, last, memory, M, has_global, n_temp):
  """Reference step: the whole final-chunk sequence `[n]` (placeholders first, padded after
  `last`), memory injected into its G·has_global + n_temp slot rows at every layer, plain causal
  attention; logits of token `last` `[V]`."""
  graphdef, params = nnx.split(model.backbone.blocks)
  g, bt = model.config.global_mem_size, model.config.temp_capacity
  x = model.backbone._embed(tokens[None])

  def layer(x, inputs):
    layer_params, memory_l, M_l = inputs
    rows = jnp.arange(x.shape[1])
    live_q = jnp.take(memory_l.Q[0], jnp.clip(bt - n_temp + rows - g * has_global, 0, bt - 1),
                      axis=0)
    is_g = (rows < g) & has_global
    is_t = (rows >= g * has_global) & (rows < g * has_global + n_temp)
    slots = jnp.where(is_g[:, None], M_l[0][jnp.clip(rows, 0, max(g - 1, 0))] if g else 0,
                      jnp.where(is_t[:, None], live_q, x[0]))
    y, _ = nnx.merge(graphdef, layer_params)(slots[None])
    return y, None

  y, _ = jax.lax.scan(layer, x, (params, memory, M))
  return model.backbone._logits(y[:, last][:, None])[0, 0]


def _reference_greedy(model, prompt, max_new):
  """§15.12's reference for one prompt: memory from the one-shot forward over the non-final
  chunks, then each step rebuilds [memory slots | final text with a <beacon> after every s text
  tokens | generated so far] and runs it from scratch. Returns (tokens, fed stream)."""
  c = model.config
  s, g = c.temp_beacon_stride, c.global_mem_size
  n_full = (len(prompt) - 1) // c.chunk_size
  text = list(prompt[n_full * c.chunk_size:])
  if n_full:                     # the non-final chunks are full training-layout chunks
    prefix = build_layout(prompt[:n_full * c.chunk_size], None, [c.chunk_size] * n_full, c)
    _, (memory, M) = _one_shot(model, jax.tree.map(lambda a: jnp.asarray(a)[None], prefix))
  else:
    memory, M = model.init_memory(1)
  n_temp = min(c.temp_capacity, n_full * c.num_comp)
  stream = [c.placeholder_id] * (g * (n_full > 0) + n_temp)
  for i, token in enumerate(text):
    stream.append(int(token))
    if (i + 1) % s == 0 and i + 1 < len(text):
      stream.append(c.temp_beacon_id)
  count, tokens, fed = len(text), [], []
  while True:
    padded = np.zeros(REFERENCE_LENGTH, np.int32)
    padded[:len(stream)] = stream
    logits = _final_chunk_logits(model, jnp.asarray(padded), len(stream) - 1, memory, M,
                                 n_full > 0, n_temp)
    x = int(jnp.argmax(logits))
    tokens.append(x)
    if len(tokens) == max_new:
      return tokens, fed
    if count % s == 0:
      stream.append(c.temp_beacon_id)
      fed.append(c.temp_beacon_id)
    stream.append(x)
    fed.append(x)
    count += 1


@pytest.mark.parametrize("lengths", [(37,), (5, 16, 53)])
def test_greedy_equals_rebuild_reference(rng, lengths):
  """§15.12: output with beacons stripped (and the fed stream) equals the rebuilding reference;
  a batch of different prompt lengths decodes row by row."""
  model = tiny_model(rng)
  prompts = _prompts(rng, lengths)
  result = generate(model, prompts, 9, return_details=True)
  for row, prompt in enumerate(prompts):
    tokens, fed = _reference_greedy(model, prompt, 9)
    np.testing.assert_array_equal(result.tokens[row], tokens)
    np.testing.assert_array_equal(result.fed[row, :result.num_fed[row]], fed)
  assert len(set(map(tuple, result.tokens.tolist()))) == len(lengths) or len(lengths) == 1


def test_streaming_prefill_equals_one_shot(rng):
  """§15.12: the chunk-at-a-time prefill gives the memories and final-chunk logits of one
  `forward_chunks` scan over the whole prompt layout."""
  model = tiny_model(rng)
  prompts = _prompts(rng, (50, 50))
  batch = layout_prompts(prompts, model.config)
  state = streaming_prefill(model, batch.prefix)
  _, one_shot_state = _one_shot(model, jax.tree.map(jnp.asarray, batch.prefix))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10), state,
               one_shot_state)
  full = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)),
                      *[build_prompt_layout(p, model.config) for p in prompts])
  logits, _ = _one_shot(model, full)
  last = batch.final.n_valid - 1
  final = jax.tree.map(jnp.asarray, batch.final)
  streamed, cache = prefill_final_chunk(model, state, final, 40)
  np.testing.assert_allclose(streamed, logits[np.arange(2), -1, last], rtol=1e-10, atol=1e-10)
  assert cache.k.shape == (2, 2, 40, 2, 16)


def test_kv_cache_covers_final_chunk_only(rng):
  """§15.12 / §8.2: Lcache = n_valid(final) + max_new + ceil(max_new/s) + 1, whatever the number
  of earlier chunks; the final chunk's memory slots are G + n_T."""
  model = tiny_model(rng)
  c = model.config
  lengths = {}
  for n_chunks in (3, 6):          # final chunks of 11 tokens, 2 vs 5 chunks before them
    result = generate(model, _prompts(rng, (16 * (n_chunks - 1) + 11,)), 7, return_details=True)
    lengths[n_chunks] = result.cache_length
    n_valid = c.global_mem_size + c.temp_capacity + 11 + math.ceil(11 / 4) - 1
    assert result.final_n_valid[0] == n_valid
    assert result.cache_length == n_valid + 7 + math.ceil(7 / 4) + 1
  assert lengths[3] == lengths[6]


def _final_stream(model, prompt, result, row):
  """Final chunk's text/beacon tokens (prompt part from the layout) followed by the fed ones."""
  layout = build_prompt_layout(prompt, model.config)
  final = layout.input_ids[-1][:layout.n_valid[-1]]
  start = model.config.global_mem_size * layout.has_global[-1] + layout.n_temp[-1]
  return list(final[start:]) + list(result.fed[row, :result.num_fed[row]])


def test_clean_mode_one_beacon_after_every_s_text_tokens(rng):
  """§15.12: the final chunk's stream (prompt and generated) has a <beacon> right after text
  tokens s, 2s, … and nowhere else."""
  model = tiny_model(rng)
  c = model.config
  prompts = _prompts(rng, (16, 21, 34, 3))
  result = generate(model, prompts, 13, return_details=True)
  for row, prompt in enumerate(prompts):
    stream = _final_stream(model, prompt, result, row)
    text_seen = 0
    for prev, token in zip([None] + stream, stream):
      if token == c.temp_beacon_id:
        assert prev != c.temp_beacon_id and text_seen % c.temp_beacon_stride == 0 and text_seen
      else:
        if text_seen and text_seen % c.temp_beacon_stride == 0:
          assert prev == c.temp_beacon_id
        text_seen += 1
    assert text_seen == (len(prompt) - 1) % c.chunk_size + 1 + result.num_tokens[row] - 1


def test_official_counter_misalignment(rng):
  """§8.4 official mode: cnt starts at G·has_g + n_T + n_x, so generated beacons are shifted by
  (G + n_T) mod s against clean mode; every prompt chunk drops its trailing <beacon>."""
  model = tiny_model(rng, generation_layout="official")
  c = model.config
  prompt = _prompts(rng, (16 + 16 + 6,))[0]                # 3 chunks, final n_x = 6
  layout = build_prompt_layout(prompt, c)
  np.testing.assert_array_equal(layout.n_comp, [3, 3, 1])  # ceil(n_x/s) − 1 in every chunk
  n_temp = int(layout.n_temp[-1])
  assert n_temp == 6
  result = generate(model, [prompt], 12, return_details=True)
  fed = list(result.fed[0, :result.num_fed[0]])
  count0 = c.global_mem_size + n_temp + 6                  # 16: a multiple of s
  text_before = [sum(t != c.temp_beacon_id for t in fed[:i])
                 for i, t in enumerate(fed) if t == c.temp_beacon_id]
  expected = [k for k in range(12) if (count0 + k) % c.temp_beacon_stride == 0]
  assert text_before == expected[:len(text_before)] and text_before
  clean = [k for k in range(12) if (6 + k) % c.temp_beacon_stride == 0]
  assert (clean[0] - expected[0]) % c.temp_beacon_stride == (
      (c.global_mem_size + n_temp) % c.temp_beacon_stride)


def test_padded_array_prompts_equal_list_prompts(rng):
  """`[B, T]` ids with a left- or right-padded mask decode like the unpadded prompts."""
  model = tiny_model(rng)
  prompts = _prompts(rng, (20, 7))
  expected = generate(model, prompts, 5)
  right = np.zeros((2, 20), np.int32)
  left = np.zeros((2, 20), np.int32)
  right[0], right[1, :7], left[0], left[1, 13:] = prompts[0], prompts[1], prompts[0], prompts[1]
  mask_right, mask_left = right * 0 + (np.arange(20) < [[20], [7]]), left * 0 + (
      np.arange(20) >= [[0], [13]])
  np.testing.assert_array_equal(generate(model, right, 5, attention_mask=mask_right), expected)
  np.testing.assert_array_equal(generate(model, left, 5, attention_mask=mask_left), expected)


def test_eos_stops_a_row_and_pads(rng):
  model = tiny_model(rng)
  prompts = _prompts(rng, (9, 30))
  free = generate(model, prompts, 6)
  eos = int(free[0, 2])
  stopped = generate(model, prompts, 6, eos_token_id=eos, pad_token_id=255, return_details=True)
  first = int(np.flatnonzero(free[0] == eos)[0])
  np.testing.assert_array_equal(stopped.tokens[0, :first + 1], free[0, :first + 1])
  assert np.all(stopped.tokens[0, first + 1:] == 255) and stopped.num_tokens[0] == first + 1
  hit = np.flatnonzero(free[1] == eos)
  stop = hit[0] + 1 if hit.size else 6
  np.testing.assert_array_equal(stopped.tokens[1, :stop], free[1, :stop])


def test_sampling_is_seeded_and_top_p_restricts(rng):
  model = tiny_model(rng)
  prompts = _prompts(rng, (18, 18))
  a = generate(model, prompts, 8, temperature=1.0, top_p=0.9, seed=3)
  np.testing.assert_array_equal(a, generate(model, prompts, 8, temperature=1.0, top_p=0.9,
                                            seed=3))
  assert not np.array_equal(a, generate(model, prompts, 8, temperature=1.0, seed=4))
  np.testing.assert_array_equal(generate(model, prompts, 8, temperature=0.7, top_p=1e-9),
                                generate(model, prompts, 8))
  logits = jnp.asarray(np.log([[0.5, 0.3, 0.15, 0.05]]), jnp.float32).repeat(400, 0)
  drawn = sample_tokens(logits, jax.random.key(int(rng.integers(1 << 30))), temperature=1.0,
                        top_p=0.75)
  assert set(np.asarray(drawn).tolist()) == {0, 1}          # the nucleus reaching 0.75


def test_degenerate_single_chunk_is_plain_qwen3_greedy(rng):
  """G=0, stride −1, a prompt shorter than a chunk: greedy decoding of the bare backbone."""
  model = tiny_model(rng, global_mem_size=0, temp_beacon_stride=-1)
  prompt = _prompts(rng, (11,))[0]
  tokens = np.zeros((1, 17), np.int32)
  tokens[0, :11] = prompt
  backbone = nnx.jit(lambda m, ids: m(ids))
  for n in range(11, 17):
    tokens[0, n] = int(jnp.argmax(backbone(model.backbone, jnp.asarray(tokens))[0, n - 1]))
  np.testing.assert_array_equal(generate(model, [prompt], 6)[0], tokens[0, 11:])


def test_bad_inputs_raise(rng):
  model = tiny_model(rng)
  good = _prompts(rng, (5,))
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, good, 0)
  with pytest.raises(ValueError, match="non-empty"):
    generate(model, [np.zeros(0, np.int32)], 3)
  with pytest.raises(ValueError, match=r"lie in \[0, 256\)"):
    generate(model, [np.array([1, 256], np.int32)], 3)
  with pytest.raises(ValueError, match="contiguous"):
    generate(model, np.ones((1, 4), np.int32), 3, attention_mask=np.array([[1, 0, 1, 1]]))
  with pytest.raises(ValueError, match="top_p"):
    generate(model, good, 3, top_p=0.0)

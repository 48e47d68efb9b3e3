"""CoMeT `fifo_mode="official"` (spec §6.5): padded compression positions, the (is_real, recency)
queue, oldest-first attended slots; against the spec example, a list-based queue and clean mode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from comet_reference import random_tokens, tiny_model
from flax import nnx

from dlax.models.comet import (IGNORE_LABEL, LayerMemory, build_batch, build_layout, inject_memory,
                               memory_nets, tiny_comet_config, update_memory_from_layout)

F64 = jnp.float64
D = 8


def _official(**overrides):
  return tiny_comet_config(fifo_mode="official", **overrides)


def _identity_temp_net(config):
  """Temp net with RLA_t = identity (norm weight 1), so a row [tag, 1, 0, …] keeps tag = x0/x1."""
  global_net, temp_net = memory_nets(D, config, param_dtype=F64, rngs=nnx.Rngs(0))
  temp_net.rla.up_proj.kernel[...] = jnp.zeros_like(temp_net.rla.up_proj.kernel[...])
  return global_net, temp_net


def _tagged_outputs(rng, layout, t, next_tag):
  """Random layer outputs `[B, L, D]` for chunk t whose rows at every valid comp_idx entry (real
  and pad) carry consecutive tags; returns (y, tags per row: list of (tag, is_real))."""
  b, _, length = layout.input_ids.shape
  y = rng.standard_normal((b, length, D))
  tags = [[] for _ in range(b)]
  for row in range(b):
    for k, p in enumerate(layout.comp_idx[row, t]):
      if p < length:
        y[row, p] = 0
        y[row, p, :2] = [next_tag, 1.0]
        tags[row].append((next_tag, k < layout.n_comp[row, t]))
        next_tag += 1
  return y, tags, next_tag


def _tags(rows):
  rows = np.asarray(rows, np.float64)
  return np.rint(rows[..., 0] / rows[..., 1]).astype(int).tolist()


def _chunk(layout, t):
  return jax.tree.map(lambda a: jnp.asarray(a[:, t]), layout)


def _run(rng, config, layout):
  """Feeds tagged outputs chunk by chunk; yields (t, memory after chunk t, tags pushed at t,
  inject result of chunk t `[B, L, D]` with x = 0)."""
  global_net, temp_net = _identity_temp_net(config)
  b, n, length = layout.input_ids.shape
  memory = LayerMemory.empty(b, config.global_mem_size, config.temp_capacity, D, F64,
                             fifo_mode=config.fifo_mode)
  M, next_tag = memory.S, 1
  step = nnx.jit(update_memory_from_layout)
  for t in range(n):
    chunk = _chunk(layout, t)
    injected = inject_memory(jnp.zeros((b, length, D), F64), memory, M, chunk.gslot_idx,
                             chunk.tslot_idx)
    y, tags, next_tag = _tagged_outputs(rng, layout, t, next_tag)
    memory, M = step(jnp.asarray(y), memory, global_net, temp_net, chunk)
    yield t, memory, tags, injected


def test_spec_example(rng):
  """§6.5: C=16, s=4, Bt=8, plan [10, 16, 14]: chunk 2 attends r0 r1 r2 pad r4 r5 r6, not r7."""
  config = _official()
  assert (config.chunk_size, config.temp_beacon_stride, config.temp_capacity) == (16, 4, 8)
  layout = build_batch([(random_tokens(rng, 40), None, [10, 16, 14])], config)
  n_valid = layout.n_valid[0]
  # Chunk 0 has m = 3: its 4th compression position is a masked pad token right after n_valid.
  np.testing.assert_array_equal(layout.n_comp[0], [3, 4, 4])
  pad = layout.comp_idx[0, 0, 3]
  assert pad == n_valid[0]
  assert layout.input_ids[0, 0, pad] == config.placeholder_id        # the pad id
  assert layout.labels[0, 0, pad] == IGNORE_LABEL and layout.positions[0, 0, pad] == n_valid[0]
  np.testing.assert_array_equal(layout.n_temp[0], [0, 3, 7])         # min(Bt, Σ real m)

  runs = list(_run(rng, config, layout))
  _, memory, _, injected = runs[2]
  length = layout.input_ids.shape[-1]
  slots = layout.tslot_idx[0, 2][layout.tslot_idx[0, 2] < length]
  # Tags are 1-based over comp positions: r_k has tag k + 1; r3 (tag 4) is chunk 0's pad.
  assert _tags(injected[0, slots]) == [1, 2, 3, 4, 5, 6, 7]
  queue_before = runs[1][1]
  assert _tags(queue_before.Q[0]) == list(range(1, 9))              # r7 queued, but not attended
  np.testing.assert_array_equal(queue_before.is_pad[0], [0, 0, 0, 1, 0, 0, 0, 0])
  others = np.setdiff1d(np.arange(length), np.concatenate([slots, layout.gslot_idx[0, 2]]))
  np.testing.assert_array_equal(injected[0, others], 0)             # no other slot is written
  # After chunk 2 (m = 4, no pads): 11 real entries → the newest 8 reals r4..r11, no pad.
  assert _tags(memory.Q[0]) == list(range(5, 13)) and not np.any(memory.is_pad)


def _reference_queue(history, bt):
  """List reference: keep the top Bt entries by (is_real, recency), chronologically."""
  order = sorted(range(len(history)), key=lambda i: (history[i][1], i))
  return [history[i] for i in sorted(order[-bt:])]


def _random_plan(rng, n_chunks, chunk_size):
  """Random sizes in [1, C], then 0 to 2 trailing empty chunks (n_chunks in all)."""
  filled = n_chunks - int(rng.integers(0, 3))
  return [int(rng.integers(1, chunk_size + 1)) for _ in range(filled)] + [0] * (n_chunks - filled)


@pytest.mark.parametrize("budget", [8, 12])
def test_matches_list_reference_for_random_plans(rng, budget):
  config = _official(temp_mem_budget=budget)
  plans = [_random_plan(rng, 6, config.chunk_size) for _ in range(4)]
  layout = build_batch([(random_tokens(rng, sum(p)), None, p) for p in plans], config)
  queues, attended_pad, pushed = [[] for _ in plans], False, np.zeros(len(plans), int)
  for t, memory, tags, injected in _run(rng, config, layout):
    for row, queue in enumerate(queues):
      n_attended = int(layout.n_temp[row, t])
      empty = plans[row][t] == 0                                     # masked: attends nothing
      assert n_attended == (0 if empty else min(budget, sum(real for _, real in queue)))
      slots = layout.tslot_idx[row, t, :n_attended]
      assert _tags(injected[row, slots]) == [tag for tag, _ in queue[:n_attended]]  # oldest first
      attended_pad |= not all(real for _, real in queue[:n_attended])
      queue[:] = _reference_queue(queue + tags[row], budget)
      pushed[row] += sum(real for _, real in tags[row])
      n = len(queue)
      assert int(memory.n_temp[row]) == n
      assert _tags(memory.Q[row, budget - n:]) == [tag for tag, _ in queue]
      np.testing.assert_array_equal(memory.is_pad[row], [False] * (budget - n) +
                                    [not real for _, real in queue])
      np.testing.assert_array_equal(memory.Q[row, :budget - n], 0)
  assert attended_pad and pushed.max() > budget        # the quirk and the overflow are exercised


def _same_weight_models(rng):
  seed = int(rng.integers(1 << 30))
  make = lambda mode: tiny_model(np.random.default_rng(seed), fifo_mode=mode)
  return make("clean"), make("official")


def test_fixed_plans_equal_clean_mode(rng):
  """Full chunks and a partial last chunk: no pad memory is ever attended, so logits and loss are
  bit-identical to clean mode (the last chunk's pads only change the final queue)."""
  clean, official = _same_weight_models(rng)
  ids = random_tokens(rng, (2, 53))                                  # plan [16, 16, 16, 5]
  labels = np.where(rng.random((2, 53)) < 0.3, -100, ids).astype(np.int32)
  np.testing.assert_array_equal(official(ids), clean(ids))
  np.testing.assert_array_equal(official.loss(ids, labels), clean.loss(ids, labels))
  layout = official.layout(ids)
  assert np.any(layout.comp_idx[:, -1, 1:] < official.config.max_chunk_len)   # pads exist


def test_variable_plan_differs_from_clean_mode(rng):
  """Plan [10, 16, 14, 13]: chunks 0–1 attend only real memories (identical logits); chunk 2
  attends chunk 0's pad memory instead of r7, so its logits and the loss differ."""
  clean, official = _same_weight_models(rng)
  ids = random_tokens(rng, (2, 53))
  plans = [[10, 16, 14, 13], [10, 16, 14, 13]]
  a, b = np.asarray(official(ids, plans=plans)), np.asarray(clean(ids, plans=plans))
  np.testing.assert_array_equal(a[:, :26], b[:, :26])
  assert np.all(np.abs(a[:, 26:40] - b[:, 26:40]).max(-1) > 1e-6)
  assert abs(float(official.loss(ids, plans=plans)) - float(clean.loss(ids, plans=plans))) > 1e-6


def test_clean_layout_unchanged_by_official_mode(rng):
  """The official layout differs from the clean one only in comp_idx's pad entries (each
  non-empty chunk then has nb valid entries, the pads at n_valid, n_valid + 1, …)."""
  config = tiny_comet_config()
  plan = _random_plan(rng, 5, config.chunk_size)
  ids = random_tokens(rng, sum(plan))
  clean = build_layout(ids, None, plan, config)
  official = build_layout(ids, None, plan, dataclasses.replace(config, fifo_mode="official"))
  for name in clean._fields:
    if name != "comp_idx":
      np.testing.assert_array_equal(getattr(official, name), getattr(clean, name))
  length, nb = config.max_chunk_len, config.num_comp
  for t, n_text in enumerate(plan):
    m, n_valid = clean.n_comp[t], clean.n_valid[t]
    np.testing.assert_array_equal(official.comp_idx[t, :m], clean.comp_idx[t, :m])
    pads = np.arange(n_valid, n_valid + nb - m) if n_text else np.full(nb - m, length)
    np.testing.assert_array_equal(official.comp_idx[t, m:], pads)

"""CoMeT forward (spec §7) vs §15 properties 1, 2, 4, 5 and 6, on the tiny config in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from comet_reference import (BACKBONE, layer_modules, naive_forward, naive_loss_sums, random_tokens,
                             tiny_model)
from flax import nnx

from dlax.models.comet import (CometConfig, build_batch, build_layout, chunk_counts, fixed_plan,
                               right_aligned_plan, uniform_plan)
from dlax.models.comet.model import token_loss_sums

N_CHUNKS = 5   # batches are padded to this many chunks, so most tests share one compilation


@nnx.jit(static_argnames="order")
def _forward_chunks(model, layout, order="chunk"):
  return model.forward_chunks(layout, order=order)


@nnx.jit
def _base_logits(backbone, ids):
  return backbone(ids)


def _close(actual, expected, tol=1e-9):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def _text_logits(logits, layout, row: int):
  """logits `[B, N, L, V]` → row's text-token logits `[T, V]` in text order (via `text_idx`)."""
  text_idx = np.asarray(layout.text_idx[row])                     # [N, C], invalid = L
  chunk, i = np.nonzero(text_idx < logits.shape[2])
  return logits[row, chunk, text_idx[chunk, i]]


def _plan(rng, kind: str) -> np.ndarray:
  """A random plan of at most N_CHUNKS chunks of the tiny config (C = 16)."""
  c = 16
  partial = c * int(rng.integers(1, N_CHUNKS)) + int(rng.integers(1, c))   # partial last chunk
  n = int(rng.integers(2, N_CHUNKS + 1))
  make = {
      "fixed": lambda: fixed_plan(c * n, c),
      "partial_last": lambda: fixed_plan(partial, c),
      "right_aligned": lambda: right_aligned_plan(partial, c),
      "uniform": lambda: uniform_plan(int(rng.integers(n, c * n + 1)), n),
      "random": lambda: rng.integers(1, c + 1, n).astype(np.int32),
  }
  return make[kind]()


def _check_memory(model, memory, M, reference):
  """Final carried state of one row (leaves `[L, ...]`) vs the reference's S and FIFO lists."""
  bt = memory.Q.shape[1]
  layers = layer_modules(model)
  for l, (S, fifo) in enumerate(zip(reference.S, reference.Q)):
    _close(memory.S[l], S)
    _close(M[l], layers[l][1].global_net(S))
    assert int(memory.n_temp[l]) == len(fifo)
    _close(memory.Q[l, bt - len(fifo):], np.stack(fifo))
    assert not np.any(np.asarray(memory.Q[l, :bt - len(fifo)]))
  assert np.all(np.asarray(memory.started))


@pytest.mark.parametrize("kind", ["fixed", "partial_last", "right_aligned", "uniform", "random"])
def test_naive_reference_plans(rng, kind):
  """§15.2 for any plan (`fifo_mode="clean"`), two rows padded with empty chunks to N_CHUNKS:
  text-position logits, final memory and the loss of `forward_chunks` equal the reference."""
  model = tiny_model(rng)
  plans = [_plan(rng, kind) for _ in range(2)]
  ids = [random_tokens(rng, int(plan.sum())) for plan in plans]
  labels = [np.where(rng.random(len(x)) < 0.25, -100, x).astype(np.int32) for x in ids]
  layout = build_batch(list(zip(ids, labels, plans)), model.config, n_chunks=N_CHUNKS)
  logits, (memory, M) = _forward_chunks(model, layout)
  total, count = 0.0, 0
  for row, (x, y, plan) in enumerate(zip(ids, labels, plans)):
    reference = naive_forward(model, x, plan)
    _close(_text_logits(logits, layout, row), reference.logits)
    _check_memory(model, jax.tree.map(lambda a, row=row: a[:, row], memory), M[:, row], reference)
    row_total, row_count = naive_loss_sums(reference.logits, y)
    total, count = total + row_total, count + row_count
  loss_total, loss_count = token_loss_sums(logits, jnp.asarray(layout.labels))
  assert int(loss_count) == count
  _close(loss_total / loss_count, total / count)


def test_call_and_loss_match_naive_reference(rng):
  """§15.2 through `model(ids)` and `model.loss(ids)`: fixed plan [16, 16, 16, 5]."""
  model = tiny_model(rng)
  ids = random_tokens(rng, (2, 53))
  logits = model(ids)
  references = [naive_forward(model, row).logits for row in ids]
  assert logits.shape == (2, 53, BACKBONE.vocab_size)
  _close(logits, jnp.stack(references))
  sums = [naive_loss_sums(ref, row) for ref, row in zip(references, ids)]
  _close(model.loss(ids), sum(s for s, _ in sums) / sum(n for _, n in sums))


@pytest.mark.parametrize("n_tokens", [64, 45])
def test_layer_major_equals_chunk_major(rng, n_tokens):
  """§15.1: logits and final memories agree between the two scan orders (with an empty chunk)."""
  model = tiny_model(rng)
  layout = build_batch([(x, None, None) for x in random_tokens(rng, (2, n_tokens))],
                       model.config, n_chunks=N_CHUNKS)
  logits_c, state_c = _forward_chunks(model, layout, order="chunk")
  logits_l, state_l = _forward_chunks(model, layout, order="layer")
  _close(logits_l, logits_c)
  jax.tree.map(_close, state_l, state_c)


def test_labels_mask_loss(rng):
  """§7.3: only labelled positions count; labels are shifted by the layout."""
  model = tiny_model(rng)
  ids = random_tokens(rng, (2, 53))
  labels = np.where(np.arange(53) >= 20, ids, -100).astype(np.int32)
  logp = jax.nn.log_softmax(model(ids)[:, 19:-1], -1)
  ce = -jnp.take_along_axis(logp, jnp.asarray(ids[:, 20:])[..., None], -1)
  _close(model.loss(ids, labels), jnp.mean(ce))


def test_degenerate_equals_base_per_chunk(rng):
  """§15.4: G=0, stride −1 → base Qwen3 on every chunk separately, positions restarting at 0.
  The partial last chunk (8 tokens) matches the start of a full one, by causality."""
  model = tiny_model(rng, global_mem_size=0, temp_beacon_stride=-1)
  ids = random_tokens(rng, (2, 48))
  per_chunk = _base_logits(model.backbone, ids.reshape(6, 16)).reshape(2, 48, -1)
  _close(model(ids[:, :40]), per_chunk[:, :40])


@pytest.mark.parametrize("n_tokens", [16, 13])
def test_single_chunk_equals_base_on_augmented_sequence(rng, n_tokens):
  """§15.4: one chunk = base Qwen3 on the text with a `<beacon>` after every s tokens (and after a
  final partial group) followed by the G readouts, compared at the text positions."""
  model = tiny_model(rng)
  config, s = model.config, model.config.temp_beacon_stride
  ids = random_tokens(rng, (2, n_tokens))
  groups = [np.append(ids[:, i:i + s], np.full((2, 1), config.temp_beacon_id, np.int32), axis=1)
            for i in range(0, n_tokens, s)]
  readouts = np.broadcast_to(np.asarray(config.global_beacon_ids, np.int32),
                             (2, config.global_mem_size))
  augmented = np.concatenate([*groups, readouts], axis=1)
  assert augmented.shape[1] == n_tokens + -(-n_tokens // s) + config.global_mem_size
  text_positions = np.arange(n_tokens) + np.arange(n_tokens) // s
  _close(model(ids), _base_logits(model.backbone, augmented)[:, text_positions])


def test_causality(rng):
  """§15.6: chunks ≤ τ are unchanged when later chunks are altered or appended."""
  model = tiny_model(rng)
  ids = random_tokens(rng, (2, 64))
  altered = ids.copy()
  altered[:, 32:] = random_tokens(rng, (2, 32))

  def text_logits(ids):
    layout = build_batch([(x, None, None) for x in ids], model.config, n_chunks=N_CHUNKS)
    logits, _ = _forward_chunks(model, layout)
    return np.stack([_text_logits(logits, layout, row) for row in range(len(ids))])

  full, changed = text_logits(ids), text_logits(altered)
  _close(changed[:, :32], full[:, :32])
  assert not np.allclose(changed[:, 32:], full[:, 32:])
  _close(text_logits(ids[:, :32]), full[:, :32])


def test_state_shape_independent_of_chunk_count(rng):
  """§15.5: the carried state is L×(2G+Bt)×d per sequence (S and M: G rows, Q: Bt rows) for any
  number of chunks."""
  model = tiny_model(rng)
  config, n_layers, d = model.config, BACKBONE.num_hidden_layers, BACKBONE.hidden_size
  g, bt = config.global_mem_size, config.temp_mem_budget
  for n_tokens in (5, 53, 16 * 64 - 3):
    layout = build_batch([(random_tokens(rng, n_tokens), None, None)], config)
    memory, M = nnx.eval_shape(lambda m, lay: m.forward_chunks(lay)[1], model, layout)
    assert memory.S.shape == M.shape == (n_layers, 1, g, d)
    assert memory.Q.shape == (n_layers, 1, bt, d)
    assert memory.n_temp.shape == memory.started.shape == (n_layers, 1)


def test_positions_and_chunk_lengths_bounded(rng):
  """§15.5 at the paper defaults: every position is below Lmax whatever the length, and n_valid
  is constant (= Lmax) from chunk index Bt/nb = 8 (the 9th chunk) on."""
  config = CometConfig()
  n_tokens = int(rng.integers(100_000, 131_072))
  plan = fixed_plan(n_tokens, config.chunk_size)
  layout = build_layout(random_tokens(rng, n_tokens), None, plan, config)
  assert layout.positions.max() < config.max_chunk_len == 5376
  n_valid = chunk_counts(fixed_plan(1 << 20, config.chunk_size), config).n_valid
  steady = config.temp_mem_budget // config.num_comp
  assert steady == 8 and np.all(n_valid[steady:] == config.max_chunk_len)
  assert np.all(np.diff(n_valid[:steady + 1]) > 0)

"""CoMeT forward with the exact layout (spec §6.3) and the user API: right padding, chunk plans,
input validation (`model(ids, attention_mask, plans)`, `model.loss`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from comet_reference import BACKBONE, random_tokens, tiny_model
from flax import nnx

from dlax.models.comet import build_batch, exact_lengths, uniform_plan
from dlax.models.comet.model import token_loss_sums


N_CHUNKS = 4   # most batches here have 2 rows of 4 chunks, so tests share compilations


@nnx.jit(static_argnames="order")
def _forward_chunks(model, layout, order="chunk"):
  return model.forward_chunks(layout, order=order)


def _close(actual, expected, tol=1e-9):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def _random_plan(rng, n_tokens, chunk_size, smallest=1):
  """Random chunk sizes in [smallest, C] (the last one may be smaller) summing to n_tokens."""
  plan = []
  while n_tokens:
    plan.append(int(rng.integers(min(smallest, n_tokens), min(chunk_size, n_tokens) + 1)))
    n_tokens -= plan[-1]
  return plan


def _text_logits(logits, layout, row):
  """Text-order logits `[T, V]` of one row, from forward_chunks' per-chunk logits (uniform
  `[B, N, L, V]` or exact list of `[B, L_τ, V]`), read chunk by chunk through text_idx."""
  chunks = layout if isinstance(layout, list) else [
      jax.tree.map(lambda a, t=t: a[:, t], layout) for t in range(layout.n_valid.shape[1])]
  per_chunk = logits if isinstance(logits, list) else [logits[:, t] for t in range(len(chunks))]
  return jnp.concatenate([chunk_logits[row, chunk.text_idx[row, :chunk.n_text[row]]]
                          for chunk_logits, chunk in zip(per_chunk, chunks)])


def test_exact_layout_equals_uniform(rng):
  """§6.3: per-chunk static lengths, chunk loop unrolled, in both orders → the uniform template's
  text-order logits, final memories and loss (random plans, a trailing empty chunk)."""
  model = tiny_model(rng)
  ids = random_tokens(rng, (2, 40))
  labels = np.where(rng.random((2, 40)) < 0.3, -100, ids).astype(np.int32)
  plans = [_random_plan(rng, 40, 16, smallest=12) for _ in range(2)]   # 3 or 4 chunks
  examples = [(x, y, p) for x, y, p in zip(ids, labels, plans)]
  n_chunks = N_CHUNKS
  uniform = build_batch(examples, model.config, n_chunks=n_chunks, layout="uniform")
  exact = build_batch(examples, model.config, n_chunks=n_chunks, layout="exact")
  assert [c.input_ids.shape[1] for c in exact] == exact_lengths(model.config, n_chunks)
  logits_u, state_u = _forward_chunks(model, uniform)
  loss_u = token_loss_sums(logits_u, jnp.asarray(uniform.labels))
  for order in ("chunk", "layer"):
    logits_e, state_e = _forward_chunks(model, exact, order=order)
    assert [l.shape for l in logits_e] == [(2, n, BACKBONE.vocab_size)
                                           for n in exact_lengths(model.config, n_chunks)]
    for row in range(2):
      _close(_text_logits(logits_e, exact, row), _text_logits(logits_u, uniform, row))
    jax.tree.map(_close, state_e, state_u)
    sums = [token_loss_sums(l, jnp.asarray(c.labels)) for l, c in zip(logits_e, exact)]
    _close(sum(s for s, _ in sums), loss_u[0])
    assert sum(int(n) for _, n in sums) == int(loss_u[1])
  # The user API with layout="exact" agrees too; config.layout picks the default.
  got = model(ids, plans=plans, layout="exact", order="layer")
  for row in range(2):
    _close(got[row], _text_logits(logits_u, uniform, row))
  _close(model.loss(ids, labels, plans=plans, layout="exact", order="layer"),
         loss_u[0] / loss_u[1])
  model.config = dataclasses.replace(model.config, layout="exact")
  assert isinstance(model.layout(ids, plans=plans), list)


def test_padded_batch_equals_rows_alone(rng):
  """Right padding: every row of a padded batch equals that row run alone; padded logits are 0
  and padded positions carry no loss."""
  model = tiny_model(rng)
  lengths = [53, 49]                                                 # N_CHUNKS chunks each
  width = 60
  ids = random_tokens(rng, (2, width))
  mask = (np.arange(width) < np.array(lengths)[:, None]).astype(np.int32)
  logits = np.asarray(model(ids, attention_mask=mask))
  assert logits.shape == (2, width, BACKBONE.vocab_size)
  sums, counts = 0.0, 0
  for row, n in enumerate(lengths):
    alone = model(ids[row:row + 1, :n])
    _close(logits[row, :n], alone[0])
    np.testing.assert_array_equal(logits[row, n:], 0)
    sums, counts = sums + model.loss(ids[row:row + 1, :n]) * (n - 1), counts + n - 1
  _close(model.loss(ids, attention_mask=mask.astype(bool)), sums / counts)
  # Garbage labels in the padding change nothing.
  labels = np.where(mask, ids, rng.integers(0, BACKBONE.vocab_size, ids.shape)).astype(np.int32)
  _close(model.loss(ids, labels, mask), sums / counts)


def test_plans_match_forward_chunks(rng):
  """`model(ids, plans=…)` and `model.loss` read the same numbers as `forward_chunks` on
  `build_batch` of those plans (text_idx gather, the layout's shifted labels): a uniform plan and
  a random one."""
  model = tiny_model(rng)
  ids = random_tokens(rng, (2, 45))
  labels = np.where(rng.random((2, 45)) < 0.3, -100, ids).astype(np.int32)
  plans = [uniform_plan(45, 4).tolist(), _random_plan(rng, 45, 16, smallest=12)]
  layout = build_batch([(x, y, p) for x, y, p in zip(ids, labels, plans)], model.config)
  assert layout.n_valid.shape == (2, N_CHUNKS)
  logits, _ = _forward_chunks(model, layout)
  got = model(ids, plans=plans)
  for row in range(2):
    _close(got[row], _text_logits(logits, layout, row))
  total, count = token_loss_sums(logits, jnp.asarray(layout.labels))
  _close(model.loss(ids, labels, plans=plans), total / count)


_IDS = np.arange(12, dtype=np.int32).reshape(2, 6)
_FULL = np.ones((2, 6), np.int32)


@pytest.mark.parametrize("call, message", [
    (lambda m: m(_IDS[0]), "rank 2"),
    (lambda m: m(_IDS.astype(np.float32)), "integer"),
    (lambda m: m(_IDS + 300), r"\[0, 256\)"),
    (lambda m: m(-_IDS - 1), r"\[0, 256\)"),
    (lambda m: m(_IDS, _FULL[:, :5]), "attention_mask shape"),
    (lambda m: m(_IDS, _FULL * 2), "attention_mask must hold only 0 and 1"),
    (lambda m: m(_IDS, _FULL.astype(np.float32)), "attention_mask must be bool or integer"),
    (lambda m: m(_IDS, np.array([[1, 1, 0, 1, 0, 0], [1] * 6], np.int32)), r"rows \[0\]"),
    (lambda m: m(_IDS, np.array([[0, 1, 1, 1, 1, 1], [1] * 6], np.int32)), "right padding"),
    (lambda m: m(_IDS, plans=[[6]]), "list of 2"),
    (lambda m: m(_IDS, plans=[[6], [4, 1]]), r"plans\[1\]: plan covers 5 tokens, expected 6"),
    (lambda m: m(_IDS, _FULL * (np.arange(6) < 4), plans=[[6], [4]]), r"plans\[0\]: .*expected 4"),
    (lambda m: m(np.zeros((1, 20), np.int32), plans=[[20]]), r"lie in \[0, 16\]"),
    (lambda m: m(_IDS, plans=[[3, 0, 3], [6]]), "trail"),
    (lambda m: m.loss(_IDS, _IDS[:, :5]), "labels must be an integer array of shape"),
    (lambda m: m.loss(_IDS, _IDS + 256), "labels must lie in"),
    (lambda m: m.loss(_IDS, _IDS * 1.0), "labels must be an integer array"),
    (lambda m: m(_IDS, order="diagonal"), "order must be"),
])
def test_bad_inputs_raise(rng, call, message):
  with pytest.raises(ValueError, match=message):
    call(tiny_model(rng))


def test_traced_ids_are_rejected(rng):
  model = tiny_model(rng)
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda ids: model(ids))(jnp.asarray(_IDS))

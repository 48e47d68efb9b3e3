"""CoMeT gradient flow (spec §15.9) on the tiny config (C=16, s=4, Bt=8, nb=4) in float64."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from comet_reference import BACKBONE, TEXT_VOCAB, random_tokens, tiny_model
from flax import nnx
from jax.test_util import check_grads

from dlax.models.comet import build_batch
from dlax.models.comet.model import token_loss_sums

C = 16
EMBEDDING = nnx.PathContains("embedding")
MEMORY_NETS = nnx.PathContains("memory_nets")


def _chunk_losses(model, layout):
  """Mean CE of every (row, chunk) `[B, N]`, each over its own labelled tokens."""
  logits, _ = model.forward_chunks(layout)
  sums, counts = jax.vmap(jax.vmap(token_loss_sums))(logits, jnp.asarray(layout.labels))
  return sums / jnp.maximum(counts, 1)


def _loss(model, layout):
  """Mean CE over every labelled token of the batch (§7.3)."""
  logits, _ = model.forward_chunks(layout)
  total, count = token_loss_sums(logits, jnp.asarray(layout.labels))
  return total / count


def _as_function_of(model, wanted, fn):
  """(f, values): f(values) = fn(model) with the params matched by `wanted` set to `values`."""
  graphdef, values, rest = nnx.split(model, nnx.All(nnx.Param, wanted), ...)
  return (lambda v: fn(nnx.merge(graphdef, v, rest))), values


def _batch(rng, config, n_rows: int, n_tokens: int):
  ids = random_tokens(rng, (n_rows, n_tokens))
  return build_batch([(x, None, None) for x in ids], config)


@pytest.mark.parametrize("memory", [True, False])
def test_chunk_loss_reaches_every_earlier_chunk(rng, memory):
  """∂loss(chunk τ)/∂embedding(token in chunk τ−k) ≠ 0 for every k ≥ 1, including k > Bt/nb = 2
  (that chunk's compression outputs have left the FIFO), and = 0 for k < 0. Every chunk holds one
  marker token found nowhere else; with an untied head its embedding row enters only as input.
  Without memory (G=0, stride −1) no gradient crosses chunks."""
  overrides = {} if memory else dict(global_mem_size=0, temp_beacon_stride=-1)
  model = tiny_model(rng, dataclasses.replace(BACKBONE, tie_word_embeddings=False), **overrides)
  n_chunks = 7
  markers = TEXT_VOCAB - n_chunks + np.arange(n_chunks)
  ids = random_tokens(rng, n_chunks * C, vocab=TEXT_VOCAB - n_chunks)
  ids[C * np.arange(n_chunks) + rng.integers(0, C - 1, n_chunks)] = markers  # the final token
  # has no label, so markers avoid the last slot of each chunk
  layout = build_batch([(ids, None, None)], model.config)
  f, embedding = _as_function_of(model, EMBEDDING, lambda m: _chunk_losses(m, layout)[0])
  jacobian, = jax.tree.leaves(jax.jit(jax.jacrev(f))(embedding))              # [N, V, d]
  norms = np.linalg.norm(np.asarray(jacobian)[:, markers], axis=-1)           # [τ, τ − k]
  later, earlier = np.triu_indices(n_chunks, 1), np.tril_indices(n_chunks, -1)
  assert np.all(np.diag(norms) > 0) and np.all(norms[later] == 0)
  if memory:
    assert np.all(norms[earlier] > 1e-9 * np.diag(norms).min()), norms
  else:
    assert np.all(norms[earlier] == 0)


def test_gradients_reach_every_memory_parameter(rng):
  """w_gate, both RLAs and both norms get finite, non-zero gradients in every layer."""
  model = tiny_model(rng)
  layout = _batch(rng, model.config, 2, 4 * C)
  f, params = _as_function_of(model, MEMORY_NETS, lambda m: _loss(m, layout))
  grads = {"/".join(map(str, path)): np.asarray(value[...])
           for path, value in nnx.to_flat_state(jax.jit(jax.grad(f))(params))}
  assert sorted(grads) == [
      "memory_nets/global_net/g_proj/kernel", "memory_nets/global_net/norm/weight",
      "memory_nets/global_net/o_proj/down_proj/kernel",
      "memory_nets/global_net/o_proj/up_proj/kernel", "memory_nets/temp_net/norm/weight",
      "memory_nets/temp_net/rla/down_proj/kernel", "memory_nets/temp_net/rla/up_proj/kernel"]
  for name, grad in grads.items():
    per_layer = np.abs(grad.reshape(BACKBONE.num_hidden_layers, -1)).max(axis=1)
    assert np.all(np.isfinite(grad)) and np.all(per_layer > 0), name


def test_zeroed_memory_changes_every_later_chunk(rng):
  """Zeroing M and Q changes the loss of every chunk τ ≥ 1 and not chunk 0's. The norm weights
  of both memory nets are set to 0, so every candidate, S, M = RLA_g(0) and FIFO entry is 0."""
  model = tiny_model(rng)
  layout = _batch(rng, model.config, 2, 5 * C - 3)
  run = nnx.jit(lambda m, lay: (_chunk_losses(m, lay), m.forward_chunks(lay)[1]))
  losses, _ = run(model, layout)
  for norm in (model.memory_nets.global_net.norm, model.memory_nets.temp_net.norm):
    norm.weight[...] = jnp.zeros_like(norm.weight[...])
  zeroed, (memory, M) = run(model, layout)
  assert not any(np.any(np.asarray(a)) for a in (memory.S, memory.Q, M))
  np.testing.assert_array_equal(zeroed[:, 0], losses[:, 0])
  assert np.all(np.abs(np.asarray(zeroed - losses)[:, 1:]) > 1e-6)


def test_memory_gradients_match_finite_differences(rng):
  """`check_grads` (reverse mode, float64) of the full chunked loss w.r.t. the gate and the
  up-projections of both RLAs."""
  model = tiny_model(rng)
  layout = _batch(rng, model.config, 1, 3 * C - 5)
  wanted = nnx.Any(nnx.PathContains("g_proj"), nnx.PathContains("up_proj"))
  f, params = _as_function_of(model, nnx.All(MEMORY_NETS, wanted), lambda m: _loss(m, layout))
  assert len(jax.tree.leaves(params)) == 3
  check_grads(jax.jit(f), (params,), order=1, modes=("rev",))

"""CoMeT forward (spec §7) vs §15 properties 1, 2, 4 and 6, on the tiny config in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.models.comet import tiny_comet_config
from dlax.models.comet.model import CometForCausalLM
from dlax.models.qwen3 import Qwen3Config

F64 = jnp.float64
TEXT_VOCAB = 240   # special ids start here (tiny_comet_config)
BACKBONE = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4)


def _model(rng, **overrides) -> CometForCausalLM:
  """Random weights: N(0, 0.2²), norm weights U(0.5, 1.5), so every path carries signal."""
  model = CometForCausalLM(BACKBONE, tiny_comet_config(**overrides), rngs=nnx.Rngs(0), dtype=F64,
                           param_dtype=F64)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var[...].shape
    value = (rng.uniform(0.5, 1.5, shape) if "norm" in "/".join(map(str, path))
             else rng.normal(0, 0.2, shape))
    var[...] = jnp.asarray(value, F64)
  return model


def _tokens(rng, shape):
  return np.asarray(rng.integers(0, TEXT_VOCAB, shape), np.int32)


def _close(actual, expected, tol=1e-9):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


@nnx.jit
def _run_block(block, x):
  """One backbone layer on x `[1, n, d]`: plain causal attention over all n tokens."""
  return block(x)[0]


def _naive_logits(model, ids):
  """§15.2 reference for one sequence: Python loops over chunks and layers, compact token lists
  built from §6.2 directly, each layer run on exactly the valid tokens (dense causal attention)."""
  c = model.config
  g, s, bt = c.global_mem_size, c.temp_beacon_stride, c.temp_capacity
  n_layers = BACKBONE.num_hidden_layers
  graphdef, params = nnx.split((model.backbone.blocks, model.memory_nets))
  layers = [nnx.merge(graphdef, jax.tree.map(lambda a, l=l: a[l], params))
            for l in range(n_layers)]
  table = model.backbone.embedding[...]
  S, Q, started, out = [None] * n_layers, [[] for _ in range(n_layers)], False, []
  for start in range(0, len(ids), c.chunk_size):
    text = list(ids[start:start + c.chunk_size])
    kinds = [("g", j) for j in range(g if started else 0)]
    kinds += [("t", j) for j in range(len(Q[0]))]
    for i, _ in enumerate(text):
      kinds.append(("x", i))
      if (i + 1) % s == 0 or i == len(text) - 1:
        kinds.append(("c", i))
    kinds += [("r", j) for j in range(g)]
    token = {"g": lambda j: c.placeholder_id, "t": lambda j: c.placeholder_id,
             "x": lambda i: text[i], "c": lambda i: c.temp_beacon_id,
             "r": lambda j: c.global_beacon_ids[j]}
    x = table[jnp.asarray([token[k](j) for k, j in kinds])]
    where = lambda kind: [p for p, (k, _) in enumerate(kinds) if k == kind]
    for l, (block, nets) in enumerate(layers):
      rows = list(x)
      for p, (k, j) in enumerate(kinds):
        if k == "g":
          rows[p] = nets.global_net(S[l][j])
        elif k == "t":
          rows[p] = Q[l][j]
      y = _run_block(block, jnp.stack(rows)[None])[0]
      cand = nets.global_net.norm(y[jnp.asarray(where("r"))])
      if started:
        gate = jax.nn.sigmoid(nets.global_net.gate_logits(cand, S[l]))
        S[l] = gate * S[l] + (1 - gate) * cand
      else:
        S[l] = cand
      Q[l] = (Q[l] + list(nets.temp_net(y[jnp.asarray(where("c"))])))[-bt:]
      x = y
    out.append(model.backbone._logits(x[jnp.asarray(where("x"))][None])[0])
    started = True
  return jnp.concatenate(out)


@pytest.mark.parametrize("n_tokens", [64, 45])
def test_layer_major_equals_chunk_major(rng, n_tokens):
  """§15.1: logits, final memories and loss agree between the two scan orders."""
  model = _model(rng)
  ids = _tokens(rng, (2, n_tokens))
  layout = model.layout(ids)
  forward = nnx.jit(lambda m, lay, order: m.forward_chunks(lay, order=order),
                    static_argnames="order")
  logits_c, state_c = forward(model, layout, order="chunk")
  logits_l, state_l = forward(model, layout, order="layer")
  _close(logits_l, logits_c)
  jax.tree.map(_close, state_l, state_c)
  assert state_c[0].S.shape == (2, 2, 4, 64) and state_c[0].Q.shape == (2, 2, 8, 64)
  _close(model.loss(ids, order="layer"), model.loss(ids, order="chunk"))


def test_naive_reference(rng):
  """§15.2: fixed plan with a partial last chunk ([16, 16, 16, 5]), logits and loss."""
  model = _model(rng)
  ids = _tokens(rng, (2, 53))
  logits = model(ids)
  expected = jnp.stack([_naive_logits(model, row) for row in ids])
  assert logits.shape == (2, 53, 256)
  _close(logits, expected)
  logp = jax.nn.log_softmax(expected[:, :-1], -1)
  ce = -jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:])[..., None], -1)
  _close(model.loss(ids), jnp.mean(ce))


def test_labels_mask_loss(rng):
  """§7.3: only labelled positions count; labels are shifted by the layout."""
  model = _model(rng)
  ids = _tokens(rng, (1, 40))
  labels = np.where(np.arange(40) >= 20, ids, -100).astype(np.int32)
  logits = model(ids)
  logp = jax.nn.log_softmax(logits[0, 19:-1], -1)
  ce = -jnp.take_along_axis(logp, jnp.asarray(ids[0, 20:])[:, None], -1)
  _close(model.loss(ids, labels), jnp.mean(ce))


def test_degenerate_equals_base_per_chunk(rng):
  """§15.4: G=0, stride −1 → base Qwen3 on every chunk separately, positions restarting at 0."""
  model = _model(rng, global_mem_size=0, temp_beacon_stride=-1)
  ids = _tokens(rng, (2, 40))
  expected = jnp.concatenate([model.backbone(jnp.asarray(ids[:, i:i + 16]))
                              for i in range(0, 40, 16)], axis=1)
  _close(model(ids), expected)


def test_causality(rng):
  """§15.6: chunks ≤ τ are unchanged when later chunks are altered or appended."""
  model = _model(rng)
  ids = _tokens(rng, (2, 64))
  altered = ids.copy()
  altered[:, 32:] = _tokens(rng, (2, 32))
  full = model(ids)
  _close(model(altered)[:, :32], full[:, :32])
  assert not np.allclose(model(altered)[:, 32:], full[:, 32:])
  _close(model(ids[:, :32]), full[:, :32])

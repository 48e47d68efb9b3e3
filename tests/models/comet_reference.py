"""Shared pieces of the CoMeT model tests: a tiny float64 model and the slow §15.2 reference.

The reference runs Python loops over chunks and layers, builds §6.2's compact token list of every
chunk directly, runs each layer with plain causal attention over that list and keeps the memory
in Python lists (`fifo_mode="clean"`). It shares no code with `dlax.models.comet.layout` or the
scans of `CometForCausalLM`; it reuses only the model's modules (blocks, memory nets, final norm
and head).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.models.comet import CometConfig, fixed_plan, tiny_comet_config
from dlax.models.comet.model import CometForCausalLM
from dlax.models.qwen3 import Qwen3Config

F64 = jnp.float64
TEXT_VOCAB = 240   # special ids start here (tiny_comet_config)
BACKBONE = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4)


def tiny_model(rng: np.random.Generator, backbone: Qwen3Config = BACKBONE,
               **overrides) -> CometForCausalLM:
  """float64 CoMeT on `backbone` and `tiny_comet_config(**overrides)` with random weights:
  N(0, 0.2²), norm weights U(0.5, 1.5), so every path carries signal."""
  model = CometForCausalLM(backbone, tiny_comet_config(**overrides), rngs=nnx.Rngs(0), dtype=F64,
                           param_dtype=F64)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var[...].shape
    value = (rng.uniform(0.5, 1.5, shape) if "norm" in "/".join(map(str, path))
             else rng.normal(0, 0.2, shape))
    var[...] = jnp.asarray(value, F64)
  return model


def random_tokens(rng: np.random.Generator, shape, vocab: int = TEXT_VOCAB) -> np.ndarray:
  """Text token ids in [0, vocab) (no special ids), int32."""
  return np.asarray(rng.integers(0, vocab, shape), np.int32)


# §6.2's compact token list.

def chunk_slots(config: CometConfig, n_text: int, n_global: int,
                n_temp: int) -> list[tuple[str, int]]:
  """One chunk's tokens in order as (kind, j): "g" global slot j, "t" temp slot j (FIFO entry j,
  oldest first), "x" text token j, "c" the compression token closing the group of text token j
  (one after every s text tokens and after a final partial group), "r" readout j."""
  slots = [("g", j) for j in range(n_global)] + [("t", j) for j in range(n_temp)]
  stride = config.temp_beacon_stride
  for i in range(n_text):
    slots.append(("x", i))
    if config.use_temp and ((i + 1) % stride == 0 or i == n_text - 1):
      slots.append(("c", i))
  return slots + [("r", j) for j in range(config.global_mem_size)]


def slot_token_ids(config: CometConfig, slots: Sequence[tuple[str, int]],
                   text: Sequence[int]) -> list[int]:
  """Input ids of `chunk_slots`: placeholder, text, `<beacon>`, `<beacon_j>`."""
  fixed = {"g": config.placeholder_id, "t": config.placeholder_id, "c": config.temp_beacon_id}
  return [int(text[j]) if kind == "x" else config.global_beacon_ids[j] if kind == "r"
          else fixed[kind] for kind, j in slots]


# The naive forward.

class NaiveResult(NamedTuple):
  """logits `[T, V]` of the text tokens in order; per layer the global state S `[G, d]` (None
  before the first chunk or without the global path) and the FIFO Q (list of `[d]`, oldest
  first)."""
  logits: jax.Array
  S: list
  Q: list


@nnx.jit
def _run_block(block, x):
  return block(x)[0]


def _rowwise(fn, rows: np.ndarray, n_rows: int) -> np.ndarray:
  """`fn` (acting row by row) on rows `[k, d]`, padded with zero rows to `n_rows` so that one
  compilation serves every k → `[k, ...]`."""
  padded = np.zeros((n_rows, *rows.shape[1:]), rows.dtype)
  padded[:len(rows)] = rows
  return np.array(fn(jnp.asarray(padded))[:len(rows)])


def layer_modules(model: CometForCausalLM) -> list:
  """[(block, memory nets)] per layer, unstacked from the model's [L] axis."""
  graphdef, params = nnx.split((model.backbone.blocks, model.memory_nets))
  return [nnx.merge(graphdef, jax.tree.map(lambda a, l=l: a[l], params))
          for l in range(model.backbone.config.n_layers)]


def naive_forward(model: CometForCausalLM, ids: Sequence[int],
                  plan: Sequence[int] | None = None) -> NaiveResult:
  """§15.2 reference for one sequence `ids [T]` cut by `plan` (default: fixed size, remainder
  last). Empty chunks change nothing; the FIFO keeps the last Bt real compression outputs.

  Each layer runs plain causal attention over the chunk's compact token list, padded at the end to
  Lmax (by causality the padding changes no real row); the bookkeeping is numpy.
  """
  config = model.config
  plan = fixed_plan(len(ids), config.chunk_size) if plan is None else plan
  layers = layer_modules(model)
  table = np.asarray(model.backbone.embedding[...])
  S, Q = [None] * len(layers), [[] for _ in layers]
  started, logits, start = False, [], 0
  for n_text in map(int, plan):
    text, start = ids[start:start + n_text], start + n_text
    if not n_text:
      continue
    slots = chunk_slots(config, n_text, config.global_mem_size if started else 0, len(Q[0]))
    rows = {kind: [p for p, (k, _) in enumerate(slots) if k == kind] for kind in "gtxcr"}
    x = table[slot_token_ids(config, slots, text)]
    for l, (block, nets) in enumerate(layers):
      if started and nets.global_net is not None:
        x[rows["g"]] = np.asarray(nets.global_net(jnp.asarray(S[l])))
      if Q[l]:
        x[rows["t"]] = np.stack(Q[l])
      y = _rowwise(lambda h, block=block: _run_block(block, h[None])[0], x, config.max_chunk_len)
      if nets.global_net is not None:
        candidate = np.asarray(nets.global_net.norm(jnp.asarray(y[rows["r"]])))
        if started:
          gate = jax.nn.sigmoid(nets.global_net.gate_logits(jnp.asarray(candidate), S[l]))
          S[l] = np.asarray(gate * S[l] + (1 - gate) * candidate)
        else:
          S[l] = candidate
      if nets.temp_net is not None:
        compressed = _rowwise(nets.temp_net, y[rows["c"]], config.num_comp)
        Q[l] = (Q[l] + list(compressed))[-config.temp_capacity:]
      x = y
    logits.append(_rowwise(lambda h: model.backbone._logits(h[None])[0], x[rows["x"]],
                           config.chunk_size))
    started = True
  return NaiveResult(np.concatenate(logits), S, Q)


def naive_loss_sums(logits, labels: Sequence[int]):
  """logits `[T, V]` of one sequence and its raw labels `[T]` (−100 = ignored) → (Σ CE, count)
  with the §6.2 shift y_i = label_{i+1}."""
  shifted = np.append(np.asarray(labels)[1:], -100)
  keep = np.flatnonzero(shifted != -100)
  logp = jax.nn.log_softmax(logits[keep], -1)
  return -jnp.sum(logp[np.arange(len(keep)), shifted[keep]]), len(keep)

"""Pictures of the two memories at work over real text: DLA's state boundaries and merges, and
CoMeT's gate values and FIFO contents.

**DLA** (`run_dla_boundaries`): the text runs through the model layer by layer, and each layer's
`dla_attention` call hands back its `DLADecisions` (b_t, I_t, merge index, live slots): the
picture is drawn from those decisions, not from a re-implementation. Per layer, one strip per
head colours the token stream by segment (a boundary b_t opens a new segment; adjacent segments
always differ in colour), and a black × marks each token whose step merged two adjacent states.

JSON (`dla_boundaries.json`): `{"eval", "model", "options", "text", "tokens", "token_text": [T],
"capacity", "tau", "layers": [L], "heads": [H], "boundaries": [L][H][positions],
"merges": [L][H][[t, i*]], "num_segments": [L][H], "max_slots": [L][H], "seconds", "files"}`.

**CoMeT** (`run_comet_memory`): the text is laid out in chunks (the fixed plan of
`config.chunk_size` tokens) and streamed through the model one chunk at a time, as in prefill.
After each (chunk, layer) cell the picture records the global gate g = σ(g_proj[candidate;
state]) of every global slot (mean over channels for the elementwise gate; blank where the state
takes the candidate ungated: the first chunk), and the FIFO: the norm of each of its Bt rows
(blank where dead) and, annotated, the chunk that wrote the row. One row of panels per layer:
gates (global slot × chunk) and FIFO (slot × chunk, oldest at the top).

JSON (`comet_memory.json`): `{"eval", "model", "options", "text", "tokens", "chunks",
"chunk_size", "layers": [L], "gates": [L][N][G] (null: ungated), "fifo_norm": [L][N][Bt]
(null: dead row), "fifo_size": [L][N] live rows, "fifo_source_chunk": [N][Bt] (−1: dead),
"seconds", "files"}`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.colors import ListedColormap

from dlax.models import LanguageModel
from dlax.models.comet import (ChunkLayout, CometForCausalLM, comet_cell, push_fifo,
                               push_queue)
from dlax.ops import DLADecisions
from dlax_training.data import Tokenizer, corpus_source
from dlax_training.evals.adapters import ModelAdapter
from dlax_training.evals.figures import new_figure, save_result

SEGMENT_COLOURS = ListedColormap(
    ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
     "#9c755f", "#bab0ac"])


def default_text() -> str:
  """Real text: the held-out novel of the embedded corpus, from its first chapter heading."""
  text = corpus_source(split="validation").texts[0]
  start = text.find("Chapter")
  return text[max(start, 0):]


def _model_of(adapter, kind):
  model = getattr(adapter, "model", adapter)
  if not isinstance(model, kind):
    raise TypeError(f"this picture needs a {kind.__name__} (or its adapter), got "
                    f"{type(model).__name__}")
  return model


def _text_tokens(tokenizer: Tokenizer, text: str | None, num_tokens: int, vocab: int):
  ids = tokenizer.encode(default_text() if text is None else text)[:num_tokens]
  if len(ids) < 2:
    raise ValueError("the picture needs a text of at least 2 tokens")
  if ids.max() >= vocab:
    raise ValueError(f"the tokenizer emits ids up to {ids.max()}; the model has {vocab}")
  return ids.astype(np.int32)


def _token_labels(tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
  return [tokenizer.decode([int(i)]).replace("\n", "⏎") for i in ids]


# ----------------------------------------------------------------------------------------- DLA

@contextlib.contextmanager
def record_dla_decisions(record: list):
  """While active, every `dla_attention` call of the multi-state layers appends its
  `DLADecisions` to `record` (inside a trace: read them there)."""
  from dlax.layers import multistate
  op = multistate.dla_attention

  def spy(*args, **kwargs):
    outputs = op(*args, **kwargs)
    record.append(outputs[-1])
    return outputs

  multistate.dla_attention = spy
  try:
    yield record
  finally:
    multistate.dla_attention = op


def dla_decisions(model: LanguageModel, tokens) -> list[DLADecisions]:
  """The `DLADecisions` (`[B, T, H]` numpy fields) of every layer of a DLA `LanguageModel` on
  tokens `[B, T]`: the layers run one after another (unrolled, jitted), each recording its op's
  decisions."""
  config = model.config
  if config.multistate != "dla":
    raise ValueError(f"DLA decisions need a model with multistate='dla', got "
                     f"{config.multistate!r}")
  graphdef, state = nnx.split(model)

  def run(state, tokens):
    model = nnx.merge(graphdef, state)
    block_def, blocks = nnx.split(model.blocks)
    x, decisions = model._embed(tokens), []
    for layer in range(config.n_layers):
      record = []
      with record_dla_decisions(record):
        block = nnx.merge(block_def, jax.tree.map(lambda a: a[layer], blocks))
        x, _ = block(x)
      decisions.append(record[-1])
    return decisions

  return [DLADecisions(*map(np.asarray, d))
          for d in jax.device_get(jax.jit(run)(state, jnp.asarray(tokens, jnp.int32)))]


def segment_ids(boundary: np.ndarray) -> np.ndarray:
  """`[..., T]` bool boundaries -> segment index of each token (a boundary opens a segment;
  tokens before the first boundary form segment 0)."""
  boundary = np.asarray(boundary, bool)
  first = boundary[..., :1]
  return np.cumsum(boundary, axis=-1) - first.astype(int)


def run_dla_boundaries(adapter: ModelAdapter | LanguageModel, tokenizer: Tokenizer, *,
                       text: str | None = None, num_tokens: int = 192,
                       layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                       out_dir) -> dict:
  """DLA segments and merges over `num_tokens` tokens of `text` (default: `default_text()`) ->
  `dla_boundaries.json` and `dla_boundaries.png` (one panel per layer, one strip per head)."""
  start = time.perf_counter()
  model = _model_of(adapter, LanguageModel)
  ids = _text_tokens(tokenizer, text, num_tokens, model.config.vocab_size)
  decisions = dla_decisions(model, ids[None])
  layers = list(range(model.config.n_layers)) if layers is None else [int(l) for l in layers]
  n_heads = decisions[0].boundary.shape[-1]
  heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
  t = len(ids)
  boundaries, merges, n_segments, max_slots = [], [], [], []
  for layer in layers:
    d = decisions[layer]
    boundaries.append([np.flatnonzero(d.boundary[0, :, h]).tolist() for h in heads])
    merges.append([[[int(i), int(d.merge_idx[0, i, h])]
                    for i in np.flatnonzero(d.merge_idx[0, :, h] >= 0)] for h in heads])
    n_segments.append([int(segment_ids(d.boundary[0, :, h])[-1]) + 1 for h in heads])
    max_slots.append([int(d.num_slots[0, :, h].max()) for h in heads])

  labels = _token_labels(tokenizer, ids)
  width = min(4 + 0.09 * t, 40)
  figure = new_figure(width, 0.9 + len(layers) * (0.25 * len(heads) + 0.45))
  axes = figure.subplots(len(layers), 1, squeeze=False)[:, 0]
  for ax, layer in zip(axes, layers):
    d = decisions[layer]
    segments = segment_ids(d.boundary[0][:, heads].T)              # [H, T]
    ax.imshow(segments % SEGMENT_COLOURS.N, cmap=SEGMENT_COLOURS, vmin=-0.5,
              vmax=SEGMENT_COLOURS.N - 0.5, aspect="auto", interpolation="nearest")
    for row, h in enumerate(heads):
      merged = np.flatnonzero(d.merge_idx[0, :, h] >= 0)
      ax.scatter(merged, np.full(len(merged), row), marker="x", color="black", s=14,
                 linewidths=0.8)
    ax.set_yticks(range(len(heads)), labels=[f"h{h}" for h in heads], fontsize=7)
    ax.set_ylabel(f"layer {layer}", fontsize=8)
    if t <= 256:
      ax.set_xticks(range(t), labels=labels, fontsize=6, family="monospace")
      ax.tick_params(axis="x", length=0, pad=1)
    else:
      ax.set_xlabel("token", fontsize=8)
  name = getattr(adapter, "name", type(model).__name__)
  axes[0].set_title(f"DLA state boundaries (colour = segment) and merges (×): {name}",
                    fontsize=10)
  result = {
      "eval": "dla_boundaries", "model": name,
      "options": dict(num_tokens=num_tokens, layers=layers, heads=heads,
                      text=None if text is None else "custom"),
      "text": tokenizer.decode(ids), "tokens": t, "token_text": labels,
      "capacity": model.config.dla.capacity, "tau": model.config.dla.tau, "layers": layers,
      "heads": heads, "boundaries": boundaries, "merges": merges, "num_segments": n_segments,
      "max_slots": max_slots, "seconds": time.perf_counter() - start,
  }
  return save_result(out_dir, "dla_boundaries", result, figure)


# --------------------------------------------------------------------------------------- CoMeT

def _gate_values(global_net, y, memory, chunk: ChunkLayout):
  """`[B, G]` mean gate σ(g_proj[candidate; S]) of this cell (`GlobalMemoryNet.update`'s gate),
  NaN where the state is not gated (not started, or no readouts in the chunk)."""
  g_size = memory.S.shape[1]
  if global_net is None or not g_size:
    return jnp.zeros((y.shape[0], 0), jnp.float32)
  readouts = jnp.take_along_axis(y, chunk.readout_idx[..., None], axis=1, mode="fill",
                                 fill_value=0)
  candidate = global_net.norm(readouts).astype(memory.S.dtype)
  gate = jax.nn.sigmoid(global_net.gate_logits(candidate, memory.S)).mean(-1)
  gated = memory.started & chunk.has_readout
  return jnp.where(gated[:, None], gate, jnp.nan).astype(jnp.float32)


@nnx.jit
def _memory_step(model: CometForCausalLM, state, chunk: ChunkLayout):
  """One chunk through all layers -> (state, gates `[L, B, G]`, FIFO row norms `[L, B, Bt]`,
  live FIFO rows `[L, B]`)."""
  graphdef, params = nnx.split((model.backbone.blocks, model.memory_nets))

  def layer(x, inputs):
    layer_params, memory, M = inputs
    block, nets = nnx.merge(graphdef, layer_params)
    y, new_memory, new_M = comet_cell(block, nets, x, memory, M, chunk)
    gate = _gate_values(nets.global_net, y, memory, chunk)
    norms = jnp.linalg.norm(new_memory.Q.astype(jnp.float32), axis=-1)
    return y, ((new_memory, new_M), (gate, norms, new_memory.n_temp))

  _, (state, captured) = jax.lax.scan(layer, model.backbone._embed(chunk.input_ids),
                                      (params, *state))
  return state, captured


def _push_sources(sources, is_pad, chunk: ChunkLayout, tau: int, official: bool):
  """The FIFO rows' source chunks + 1 `[B, Bt, 1]` (float, 0 dead) after chunk `tau`'s push, by
  the model's own FIFO functions (their row bookkeeping does not depend on the contents)."""
  n_live = jnp.sum(sources[..., 0] > 0, axis=-1).astype(jnp.int32)
  c = jnp.full((*chunk.comp_idx.shape, 1), tau + 1.0)
  n_comp = jnp.asarray(chunk.n_comp, jnp.int32)
  if not official:
    new, _ = push_fifo(sources, n_live, c, n_comp)
    return new, is_pad
  length = chunk.input_ids.shape[-1]
  n_pad = jnp.sum(jnp.asarray(chunk.comp_idx) < length, axis=-1).astype(jnp.int32) - n_comp
  new, n_live, is_pad = push_queue(sources, n_live, is_pad, c, n_comp, n_pad)
  return new, is_pad


def run_comet_memory(adapter: ModelAdapter | CometForCausalLM, tokenizer: Tokenizer, *,
                     text: str | None = None, num_tokens: int | None = None,
                     layers: Sequence[int] | None = None, out_dir) -> dict:
  """CoMeT gates and FIFO per layer and chunk over `num_tokens` tokens of `text` (default: 8
  chunks of `default_text()`) -> `comet_memory.json` and `comet_memory.png`."""
  start = time.perf_counter()
  model = _model_of(adapter, CometForCausalLM)
  config = model.config
  num_tokens = 8 * config.chunk_size if num_tokens is None else num_tokens
  ids = _text_tokens(tokenizer, text, num_tokens, model.backbone.config.vocab_size)
  layout = model.layout(ids[None], layout="uniform")                      # [1, N, ...]
  n_chunks = layout.input_ids.shape[1]
  state = model.init_memory(1)
  bt = config.temp_capacity
  official = config.fifo_mode == "official"
  sources = jnp.zeros((1, bt, 1))
  is_pad = jnp.zeros((1, bt), bool)
  gates, norms, sizes, source_chunks = [], [], [], []
  for tau in range(n_chunks):
    chunk = ChunkLayout(*(jnp.asarray(np.asarray(a)[:, tau]) for a in layout))
    state, (gate, norm, size) = _memory_step(model, state, chunk)
    gates.append(np.asarray(gate)[:, 0])                                   # [L, G]
    live = np.arange(bt) >= bt - np.asarray(size)[:, :1]                   # [L, Bt]
    norms.append(np.where(live, np.asarray(norm)[:, 0], np.nan))
    sizes.append(np.asarray(size)[:, 0])
    if bt:
      sources, is_pad = _push_sources(sources, is_pad, chunk, tau, official)
    source_chunks.append(np.asarray(sources[0, :, 0]).astype(int) - 1)
  layers = list(range(model.backbone.config.n_layers)) if layers is None else [int(l)
                                                                               for l in layers]
  gates = np.stack(gates, 1)[layers]                                       # [L, N, G]
  norms = np.stack(norms, 1)[layers]                                       # [L, N, Bt]
  sizes = np.stack(sizes, 1)[layers]                                       # [L, N]
  source_chunks = np.stack(source_chunks)                                  # [N, Bt]

  g_size = gates.shape[-1]
  panels = [p for p, size in (("gate", g_size), ("fifo", bt)) if size]
  height = max(g_size, bt, 4)
  figure = new_figure(1.5 + 4.2 * len(panels), 0.8 + len(layers) * (0.9 + 0.12 * height))
  axes = figure.subplots(len(layers), max(len(panels), 1), squeeze=False)
  chunk_labels = [str(tau) for tau in range(n_chunks)]
  for row, layer in enumerate(layers):
    for col, panel in enumerate(panels):
      ax = axes[row, col]
      if panel == "gate":
        image = ax.imshow(np.ma.masked_invalid(gates[row].T), cmap="magma", vmin=0, vmax=1,
                          aspect="auto", interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nglobal slot", fontsize=8)
        figure.colorbar(image, ax=ax, label="gate g (keep state)")
      else:
        image = ax.imshow(np.ma.masked_invalid(norms[row].T), cmap="viridis", aspect="auto",
                          interpolation="nearest")
        if bt * n_chunks <= 400:
          for (tau, slot), src in np.ndenumerate(source_chunks):
            if src >= 0 and np.isfinite(norms[row, tau, slot]):
              ax.text(tau, slot, str(src), ha="center", va="center", fontsize=6, color="white")
        ax.set_ylabel(f"layer {layer}\nFIFO row (oldest top)", fontsize=8)
        figure.colorbar(image, ax=ax, label="‖row‖ (text: source chunk)")
      ax.set_xticks(range(n_chunks), labels=chunk_labels, fontsize=7)
      if row == len(layers) - 1:
        ax.set_xlabel("after chunk", fontsize=8)
  title = getattr(adapter, "name", "CometForCausalLM")
  figure.suptitle(f"CoMeT memory per layer and chunk: {title}", fontsize=10)
  result = {
      "eval": "comet_memory", "model": title,
      "options": dict(num_tokens=num_tokens, layers=layers,
                      text=None if text is None else "custom"),
      "text": tokenizer.decode(ids), "tokens": len(ids), "chunks": n_chunks,
      "chunk_size": config.chunk_size, "gate": config.gate, "fifo_mode": config.fifo_mode,
      "layers": layers, "gates": gates, "fifo_norm": norms, "fifo_size": sizes,
      "fifo_source_chunk": source_chunks, "seconds": time.perf_counter() - start,
  }
  return save_result(out_dir, "comet_memory", result, figure)

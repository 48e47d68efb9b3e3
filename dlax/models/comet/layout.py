"""Host-side CoMeT token layout (spec §6, §8.1): chunk plans, per-chunk counts, index tables.

A chunk of `n_x` text tokens becomes the compact sequence (§6.2)

  [ G global slots | n_T temporary slots | text, a `<beacon>` after every s tokens | G readouts ]

padded to a static length L (Lmax for the uniform template, the per-index exact length otherwise).
Every index table points at L for its invalid entries, so `x.at[idx].set(..., mode="drop")`
ignores them. Everything here is numpy and vectorised over chunks.

With `fifo_mode="official"` (§6.5) a non-empty training chunk also gets `nb − m` masked pad
tokens right after its n_valid valid tokens: `comp_idx[m:nb]` point at them, so their layer
outputs enter the FIFO as pad memories (`memory.push_queue`). They carry the pad id, label -100
and the padding position n_valid (the reference's positions for them are unverified).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from dlax.models.comet.config import CometConfig

IGNORE_LABEL = -100
INDEX_DTYPE = np.int32


class ChunkCounts(NamedTuple):
  """Per-chunk counts (§6.1), each [N] (or scalars for one chunk)."""
  n_text: np.ndarray       # n_x: text tokens
  n_comp: np.ndarray       # m: compression tokens
  n_temp: np.ndarray       # n_T: live temporary slots
  has_global: np.ndarray   # has_g: G global slots lead the chunk
  has_readout: np.ndarray  # has_r: G readouts end the chunk
  is_first: np.ndarray     # chunk index 0 (the global state starts ungated)
  n_valid: np.ndarray      # G·has_g + n_T + n_x + m + G·has_r


class ChunkLayout(NamedTuple):
  """One chunk's model inputs, shapes [..., L] / [..., K] / [...] for leading batch/chunk axes."""
  input_ids: np.ndarray    # [..., L] placeholder / text / <beacon> / <beacon_j> / pad
  labels: np.ndarray       # [..., L] shifted labels on text slots, -100 elsewhere
  positions: np.ndarray    # [..., L] p for valid tokens, n_valid for padding
  n_valid: np.ndarray      # [...] attention key length (use max(n_valid, 1) in kernels)
  gslot_idx: np.ndarray    # [..., G] global slot j (invalid: L)
  tslot_idx: np.ndarray    # [..., Bt] temp slot j ← FIFO entry j, oldest first (count n_temp)
  comp_idx: np.ndarray     # [..., nb] compression tokens (count n_comp; then official pads)
  readout_idx: np.ndarray  # [..., G] readout j
  text_idx: np.ndarray     # [..., C] text token i (count n_text): gathers logits in text order
  n_text: np.ndarray       # [...]
  n_comp: np.ndarray       # [...]
  n_temp: np.ndarray       # [...]
  is_first: np.ndarray     # [...] bool
  has_global: np.ndarray   # [...] bool
  has_readout: np.ndarray  # [...] bool


_TOKEN_FIELDS = ("input_ids", "labels", "positions")
_INDEX_FIELDS = ("gslot_idx", "tslot_idx", "comp_idx", "readout_idx", "text_idx")


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
  return -(-a // b)


# Chunk plans (§6.4).

def fixed_plan(n_tokens: int, chunk_size: int) -> np.ndarray:
  """Fixed-size chunks, remainder last (inference and the default training plan)."""
  full, rest = divmod(n_tokens, chunk_size)
  return np.array([chunk_size] * full + ([rest] if rest else []), dtype=INDEX_DTYPE)


def right_aligned_plan(n_tokens: int, chunk_size: int) -> np.ndarray:
  """Fixed-size chunks, remainder first."""
  return fixed_plan(n_tokens, chunk_size)[::-1].copy()


def uniform_plan(n_tokens: int, n_chunks: int) -> np.ndarray:
  """`n_chunks` chunks whose sizes differ by at most 1 (larger ones first)."""
  base, rest = divmod(n_tokens, n_chunks)
  return np.array([base + 1] * rest + [base] * (n_chunks - rest), dtype=INDEX_DTYPE)


def pad_plan(plan: Sequence[int], n_chunks: int) -> np.ndarray:
  """Appends empty chunks up to `n_chunks` (§6.4); they are fully masked and update nothing."""
  plan = np.asarray(plan, dtype=INDEX_DTYPE)
  if len(plan) > n_chunks:
    raise ValueError(f"plan has {len(plan)} chunks, more than n_chunks={n_chunks}")
  return np.concatenate([plan, np.zeros(n_chunks - len(plan), INDEX_DTYPE)])


def validate_plan(plan: Sequence[int], chunk_size: int, n_tokens: int | None = None) -> np.ndarray:
  """Checks a plan (sizes in [0, C], empty chunks only trailing, sum = n_tokens) → int array."""
  plan = np.asarray(plan)
  if plan.ndim != 1 or (plan.size and not np.issubdtype(plan.dtype, np.integer)):
    raise ValueError(f"plan must be a 1-D sequence of ints, got {plan!r}")
  plan = plan.astype(INDEX_DTYPE)
  if np.any(plan < 0) or np.any(plan > chunk_size):
    raise ValueError(f"chunk sizes must lie in [0, {chunk_size}], got {plan.tolist()}")
  nonempty = np.flatnonzero(plan)
  if nonempty.size and np.any(plan[:nonempty[-1]] == 0):
    raise ValueError(f"empty chunks may only trail the plan, got {plan.tolist()}")
  if n_tokens is not None and int(plan.sum()) != n_tokens:
    raise ValueError(f"plan covers {int(plan.sum())} tokens, expected {n_tokens}")
  return plan


# Counts and static lengths (§6.1, §6.3).

def chunk_counts(plan: Sequence[int], config: CometConfig, *, generation: bool = False,
                 official: bool | None = None) -> ChunkCounts:
  """Per-chunk counts for `plan` (FIFO in `fifo_mode="clean"` semantics).

  `generation=True` lays out a prompt (§8.1): the final chunk has no readouts and no trailing
  `<beacon>`; with `official` (default: `config.generation_layout == "official"`) every chunk drops
  its trailing `<beacon>`.
  """
  n_text = validate_plan(plan, config.chunk_size)
  n = len(n_text)
  nonempty = n_text > 0
  is_final = np.arange(n) == n - 1
  if generation and not np.all(nonempty):
    raise ValueError(f"a generation prompt plan has no empty chunks, got {n_text.tolist()}")
  if official is None:
    official = config.generation_layout == "official"
  if config.use_temp:
    n_comp = _ceil_div(n_text, config.temp_beacon_stride)
    if generation:
      n_comp = np.maximum(n_comp - (is_final | official), 0)
  else:
    n_comp = np.zeros_like(n_text)
  earlier = np.cumsum(n_comp) - n_comp
  n_temp = np.where(nonempty, np.minimum(config.temp_capacity, earlier), 0)
  has_global = (np.arange(n) > 0) & nonempty
  has_readout = nonempty & ~(generation & is_final)
  g = config.global_mem_size
  n_valid = g * has_global + n_temp + n_text + n_comp + g * has_readout
  as_index = lambda a: a.astype(INDEX_DTYPE)
  return ChunkCounts(as_index(n_text), as_index(n_comp), as_index(n_temp), has_global,
                     has_readout, np.arange(n) == 0, as_index(n_valid))


def exact_lengths(config: CometConfig, n_chunks: int | None = None) -> list[int]:
  """Static per-index lengths (§6.3): C+nb+G, then C+nb+2G+min(Bt, τ·nb); default N = max_len/C.

  Each is an upper bound on n_valid at that chunk index for any plan.
  """
  n_chunks = config.num_chunks if n_chunks is None else n_chunks
  base = config.chunk_size + config.num_comp + config.global_mem_size
  return [base if tau == 0 else
          base + config.global_mem_size + min(config.temp_capacity, tau * config.num_comp)
          for tau in range(n_chunks)]


# Building chunks.

def shift_labels(labels: np.ndarray) -> np.ndarray:
  """y_i = label_{i+1}, -100 past the end (done before chunking, §6.2)."""
  labels = np.asarray(labels)
  return np.concatenate([labels[1:], [IGNORE_LABEL]]).astype(INDEX_DTYPE)


def _split_text(values: np.ndarray, plan: np.ndarray, chunk_size: int, fill: int) -> np.ndarray:
  """[n_tokens] → [N, C], chunk τ's tokens left-aligned, `fill` after them."""
  i = np.arange(chunk_size)
  source = (np.cumsum(plan) - plan)[:, None] + i
  source = np.where(i < plan[:, None], source, len(values))
  return np.append(np.asarray(values, INDEX_DTYPE), INDEX_DTYPE(fill))[source]


def _scatter(buffer: np.ndarray, idx: np.ndarray, values) -> None:
  """buffer[n, idx[n, k]] = values[n, k]; invalid idx hit the trash column buffer[:, -1]."""
  np.put_along_axis(buffer, idx, np.broadcast_to(values, idx.shape), axis=1)


def _official_pads(counts: ChunkCounts, config: CometConfig) -> np.ndarray:
  """[N] masked pad compression tokens per chunk under the official FIFO (§6.5): nb − m for
  non-empty chunks, else 0."""
  return np.where(counts.n_text > 0, config.num_comp - counts.n_comp, 0).astype(INDEX_DTYPE)


def _build(text_ids: np.ndarray, text_labels: np.ndarray, counts: ChunkCounts,
           config: CometConfig, length: int, pad_id: int | None,
           n_pads: np.ndarray | None = None) -> ChunkLayout:
  """Vectorised over chunks: text [N, C] and counts [N] → ChunkLayout [N, ...] of length L.

  `n_pads` [N] (official FIFO): pad compression tokens placed after each chunk's n_valid tokens.
  """
  n_valid = counts.n_valid
  n_pads = np.zeros_like(n_valid) if n_pads is None else n_pads
  if np.any(n_valid + n_pads > length):
    raise ValueError(f"chunks need lengths {(n_valid + n_pads).tolist()}, more than "
                     f"length={length}")
  col = lambda a: np.asarray(a, INDEX_DTYPE)[:, None]
  g, stride = config.global_mem_size, config.temp_beacon_stride
  off_t = col(g * counts.has_global)
  off_x = off_t + col(counts.n_temp)
  off_r = off_x + col(counts.n_text) + col(counts.n_comp)
  valid_or_end = lambda ok, idx: np.where(ok, idx, length).astype(INDEX_DTYPE)

  i = np.arange(config.chunk_size)[None]
  text_idx = valid_or_end(i < col(counts.n_text),
                          off_x + i + (i // stride if config.use_temp else 0))
  k = np.arange(config.num_comp)[None]
  comp_idx = valid_or_end(k < col(counts.n_comp),
                          off_x + np.minimum((k + 1) * stride, col(counts.n_text)) + k)
  j = np.arange(g)[None]
  gslot_idx = valid_or_end(col(counts.has_global) > 0, j)
  readout_idx = valid_or_end(col(counts.has_readout) > 0, off_r + j)
  t = np.arange(config.temp_capacity)[None]
  tslot_idx = valid_or_end(t < col(counts.n_temp), off_t + t)

  n = len(n_valid)
  pad_id = config.placeholder_id if pad_id is None else pad_id
  input_ids = np.full((n, length + 1), pad_id, INDEX_DTYPE)
  for idx, values in ((gslot_idx, config.placeholder_id), (tslot_idx, config.placeholder_id),
                      (text_idx, text_ids), (comp_idx, config.temp_beacon_id),
                      (readout_idx, np.asarray(config.global_beacon_ids, INDEX_DTYPE))):
    _scatter(input_ids, idx, values)
  labels = np.full((n, length + 1), IGNORE_LABEL, INDEX_DTYPE)
  _scatter(labels, text_idx, text_labels)
  p = np.arange(length, dtype=INDEX_DTYPE)[None]
  positions = np.where(p < col(n_valid), p, col(n_valid)).astype(INDEX_DTYPE)
  # Official pads: comp k ∈ [m, m + n_pads) at n_valid + k − m, padding in every other respect.
  comp_idx = np.where((k >= col(counts.n_comp)) & (k < col(counts.n_comp + n_pads)),
                      col(n_valid) + k - col(counts.n_comp), comp_idx).astype(INDEX_DTYPE)
  return ChunkLayout(input_ids[:, :length], labels[:, :length], positions, n_valid, gslot_idx,
                     tslot_idx, comp_idx, readout_idx, text_idx, counts.n_text, counts.n_comp,
                     counts.n_temp, counts.is_first, counts.has_global, counts.has_readout)


def truncate_chunks(layout: ChunkLayout, length: int) -> ChunkLayout:
  """Cuts a chunk's token axis to `length` ≥ n_valid and re-points invalid indices at it."""
  return layout._replace(
      **{name: getattr(layout, name)[..., :length] for name in _TOKEN_FIELDS},
      **{name: np.minimum(getattr(layout, name), length) for name in _INDEX_FIELDS})


def take_chunks(layout: ChunkLayout, index) -> ChunkLayout:
  """Every field indexed by `index` (e.g. one chunk τ, or `[:, τ]`)."""
  return ChunkLayout(*(np.asarray(a)[index] for a in layout))


def stack_chunks(layouts: Sequence[ChunkLayout], axis: int = 0) -> ChunkLayout:
  """Stacks layouts of equal shapes along a new leading (batch or chunk) axis."""
  return ChunkLayout(*(np.stack(arrays, axis) for arrays in zip(*layouts)))


def concat_chunks(layouts: Sequence[ChunkLayout]) -> ChunkLayout:
  """Concatenates layouts `[N_i, ...]` along their leading chunk axis."""
  return ChunkLayout(*(np.concatenate(arrays) for arrays in zip(*layouts)))


def build_chunk(text_ids: Sequence[int], text_labels: Sequence[int], counts: ChunkCounts,
                config: CometConfig, length: int, *, pad_id: int | None = None) -> ChunkLayout:
  """One chunk: its n_x text ids and (already shifted) labels, scalar `counts` → arrays [L].

  No official-FIFO pad tokens (only `build_layout` adds them, to training chunks).
  """
  row = lambda values, fill: _split_text(values, np.array([len(values)]), config.chunk_size, fill)
  if len(text_ids) != counts.n_text or len(text_labels) != counts.n_text:
    raise ValueError(f"expected {counts.n_text} text ids and labels, got {len(text_ids)} and "
                     f"{len(text_labels)}")
  counts = ChunkCounts(*(np.atleast_1d(c) for c in counts))
  stacked = _build(row(text_ids, 0), row(text_labels, IGNORE_LABEL), counts, config, length,
                   pad_id)
  return take_chunks(stacked, 0)


def build_layout(input_ids: Sequence[int], labels: Sequence[int] | None, plan: Sequence[int],
                 config: CometConfig, *, length: int | None = None, generation: bool = False,
                 official: bool | None = None, pad_id: int | None = None) -> ChunkLayout:
  """Lays out one example: ids and raw labels [n_tokens] → ChunkLayout [N_chunks, ...].

  Every chunk is padded to `length` (default: the uniform template Lmax). `labels=None` trains on
  every next token; labels are shifted before chunking. `pad_id` defaults to the placeholder
  (padding is masked). `generation`/`official` as in `chunk_counts`. With
  `config.fifo_mode="official"`, training chunks (not generation prompts) get the masked pad
  compression tokens of §6.5 (see the module docstring).
  """
  input_ids = np.asarray(input_ids)
  labels = input_ids if labels is None else np.asarray(labels)
  if input_ids.ndim != 1 or labels.shape != input_ids.shape:
    raise ValueError(f"input_ids and labels must be 1-D of one length, got {input_ids.shape} and "
                     f"{labels.shape}")
  plan = validate_plan(plan, config.chunk_size, n_tokens=len(input_ids))
  counts = chunk_counts(plan, config, generation=generation, official=official)
  text_ids = _split_text(input_ids, plan, config.chunk_size, 0)
  text_labels = _split_text(shift_labels(labels), plan, config.chunk_size, IGNORE_LABEL)
  length = config.max_chunk_len if length is None else length
  n_pads = (_official_pads(counts, config)
            if config.fifo_mode == "official" and not generation else None)
  return _build(text_ids, text_labels, counts, config, length, pad_id, n_pads)


def build_layout_exact(input_ids: Sequence[int], labels: Sequence[int] | None,
                       plan: Sequence[int], config: CometConfig, **kwargs) -> list[ChunkLayout]:
  """As `build_layout`, but chunk τ has its exact static length `exact_lengths(config)[τ]`."""
  lengths = exact_lengths(config, len(plan))
  stacked = build_layout(input_ids, labels, plan, config, length=max(lengths, default=0),
                         **kwargs)
  return [truncate_chunks(take_chunks(stacked, tau), length) for tau, length in enumerate(lengths)]


def build_prompt_layout(prompt_ids: Sequence[int], config: CometConfig, *,
                        official: bool | None = None, length: int | None = None,
                        pad_id: int | None = None) -> ChunkLayout:
  """Generation prompt (§8.1): fixed plan, no labels, final chunk without readouts/last beacon."""
  prompt_ids = np.asarray(prompt_ids)
  return build_layout(prompt_ids, np.full(prompt_ids.shape, IGNORE_LABEL),
                      fixed_plan(len(prompt_ids), config.chunk_size), config, length=length,
                      generation=True, official=official, pad_id=pad_id)


def build_batch(examples: Sequence[tuple[Sequence[int], Sequence[int] | None,
                                         Sequence[int] | None]],
                config: CometConfig, *, n_chunks: int | None = None, layout: str | None = None,
                pad_id: int | None = None) -> ChunkLayout | list[ChunkLayout]:
  """Stacks training examples `(input_ids, labels or None, plan or None = fixed)` into a batch.

  Plans are padded with empty chunks to `n_chunks` (default: the longest plan). With
  `layout="uniform"` (default: `config.layout`) returns ChunkLayout [B, N, ...]; with `"exact"`
  a list over chunk index of ChunkLayout [B, ...] of length `exact_lengths(config)[τ]`.
  """
  plans = [fixed_plan(len(ids), config.chunk_size) if plan is None else np.asarray(plan)
           for ids, _, plan in examples]
  n_chunks = max(map(len, plans), default=0) if n_chunks is None else n_chunks
  layout = config.layout if layout is None else layout
  build = {"uniform": build_layout, "exact": build_layout_exact}[layout]
  per_example = [build(ids, labels, pad_plan(plan, n_chunks), config, pad_id=pad_id)
                 for (ids, labels, _), plan in zip(examples, plans)]
  if layout == "uniform":
    return stack_chunks(per_example)
  return [stack_chunks(chunks) for chunks in zip(*per_example)]


# Text order (host-side gathers for the model's text-order outputs).

def per_chunk(layout: ChunkLayout | Sequence[ChunkLayout]) -> list[ChunkLayout]:
  """Uniform ChunkLayout [B, N, ...] or the exact list → list of per-chunk ChunkLayout [B, ...]."""
  if isinstance(layout, ChunkLayout):
    return [take_chunks(layout, (slice(None), tau)) for tau in range(np.shape(layout.n_valid)[1])]
  return list(layout)


def text_order_index(layout: ChunkLayout | Sequence[ChunkLayout], width: int) -> np.ndarray:
  """[B, width] index of each row's text tokens, in text order, into the chunks' token axes laid
  end to end (`[B, N·L]` uniform, `[B, Σ L_τ]` exact); -1 past a row's last token."""
  chunks = per_chunk(layout)
  offsets = np.cumsum([0] + [np.shape(c.input_ids)[-1] for c in chunks])[:-1]
  flat = np.stack([np.asarray(c.text_idx) + off for c, off in zip(chunks, offsets)], 1)
  valid = np.arange(flat.shape[-1]) < np.stack([c.n_text for c in chunks], 1)[..., None]
  index = np.full((len(flat), width), -1, INDEX_DTYPE)
  for row, (indices, ok) in enumerate(zip(flat, valid)):
    tokens = indices[ok]                                  # chunk-major, i.e. text order
    if len(tokens) > width:
      raise ValueError(f"row {row} has {len(tokens)} text tokens, more than width={width}")
    index[row, :len(tokens)] = tokens
  return index


def text_order_labels(layout: ChunkLayout | Sequence[ChunkLayout], index: np.ndarray) -> np.ndarray:
  """The layout's (shifted) labels at `text_order_index` → [B, width]; -100 where index is -1."""
  labels = np.concatenate([np.asarray(c.labels) for c in per_chunk(layout)], axis=1)
  taken = np.take_along_axis(labels, np.maximum(index, 0), axis=1)
  return np.where(index >= 0, taken, IGNORE_LABEL).astype(INDEX_DTYPE)

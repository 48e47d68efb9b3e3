"""Model adapters: one scoring interface for `LanguageModel`, `CometForCausalLM` and plain
functions, so that every evaluation runs unchanged on each.

    adapter = make_adapter(model)                    # LMAdapter or CometAdapter
    scores = adapter.score(tokens, answer_mask)      # tokens [B, T] int, answer_mask [B, T] bool
    scores.hit[b, t]    # token t is an answer and is the argmax of the logits at t − 1
    scores.nll[b, t]    # −log p(token t | tokens < t) at answer tokens (0 elsewhere)

Scoring is teacher forcing: an answer is exact when every one of its tokens is the argmax, which
is exactly when greedy decoding after the prompt reproduces it. Only the logits at the positions
that predict answer tokens are computed (never `[B, T, V]` unless every token is an answer):

- `LMAdapter`: one forward of the blocks, or with `segment_len` a stream of segments through the
  decode cache (fixed-size for the recurrent, Log-Linear and DLA mixers; a KV cache of T rows
  for attention), stopping after the last answer.
- `CometAdapter`: the uniform chunk layout, streamed one chunk at a time through all layers with
  only the per-layer memory kept (`generation.advance_memory`), so device memory does not grow
  with T; chunks after the last answer are never run. Lengths of 1M tokens cost time, not memory.
- `FunctionAdapter`: `predict(prefix ids) -> next id`, called once per answer token on the prefix
  only (oracles, baselines).

`score_rows` batches variable-length rows: each is right-padded to a multiple of the adapter's
`length_multiple` (padding after a row's last answer cannot change causal outputs) and rows of
equal padded length are scored together, `batch_size` at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.models import LanguageModel
from dlax.models.comet import ChunkLayout, CometForCausalLM
from dlax.models.comet.generation import advance_memory

Row = tuple[np.ndarray, np.ndarray]   # (ids [n] int, answer_mask [n] bool)


class TokenScores(NamedTuple):
  """Per-token teacher-forcing scores, `[B, T]` numpy, indexed by the answer token's position."""
  hit: np.ndarray   # bool: an answer token that is the argmax of its prediction
  nll: np.ndarray   # float64: −log p(token) at answer tokens, 0 elsewhere

  def per_row(self, answer_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact: every answer token is the argmax, False for a row without answers; summed NLL;
    number of answer tokens), each `[B]` (scalars for a single `[T]` row)."""
    mask = np.asarray(answer_mask, bool)
    count = mask.sum(-1)
    exact = ((self.hit & mask).sum(-1) == count) & (count > 0)
    return exact, np.where(mask, self.nll, 0.0).sum(-1), count


@runtime_checkable
class ModelAdapter(Protocol):
  """What the evaluations need from a model."""
  name: str
  vocab_size: int
  length_multiple: int   # rows are right-padded to a multiple of this (fewer compilations)

  def score(self, tokens: np.ndarray, answer_mask: np.ndarray) -> TokenScores:
    """tokens `[B, T]` int, answer_mask `[B, T]` bool (column 0 must be False: nothing predicts
    the first token) -> `TokenScores [B, T]`."""


def check_inputs(tokens, answer_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Validated numpy copies: `[B, T]` ints in [0, vocab), a bool mask of the same shape."""
  tokens, mask = np.asarray(tokens), np.asarray(answer_mask)
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens must be an integer [B, T] array, got {tokens.dtype} {tokens.shape}")
  if mask.shape != tokens.shape or mask.dtype != bool:
    raise ValueError(f"answer_mask must be bool of shape {tokens.shape}, got {mask.dtype} "
                     f"{mask.shape}")
  if mask[:, :1].any():
    raise ValueError("answer_mask[:, 0] must be False: no logits predict the first token")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{tokens.min()}, "
                     f"{tokens.max()}]")
  return tokens.astype(np.int32), mask


def _bucket(n: int, least: int) -> int:
  """A static width for `n` gathered positions: the next power of two, at least `least`."""
  return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _answer_table(mask: np.ndarray, lo: int = 0, hi: int | None = None, least: int = 8):
  """Answer positions p with lo <= p − 1 < hi, per row, padded to a static width (a power of
  two, at least `least`): (source positions p − 1 [B, K], valid [B, K], positions per row)."""
  hi = mask.shape[1] if hi is None else hi
  positions = [np.flatnonzero(row[lo + 1:hi + 1]) + lo + 1 for row in mask]
  width = _bucket(max(map(len, positions), default=0), least)
  src = np.full((len(mask), width), lo, np.int32)     # padding: a valid in-range position
  valid = np.zeros((len(mask), width), bool)
  for b, p in enumerate(positions):
    src[b, :len(p)], valid[b, :len(p)] = p - 1, True
  return src, valid, positions


def _hits_and_nll(logits, targets):
  """logits `[B, K, V]`, targets `[B, K]` -> (argmax == target, −log p(target))."""
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return jnp.argmax(logp, -1) == targets, nll


def _scatter(scores: TokenScores, b: int, positions: np.ndarray, hit, nll) -> None:
  n = len(positions)
  scores.hit[b, positions] = np.asarray(hit[:n])
  scores.nll[b, positions] = np.asarray(nll[:n], np.float64)


def _empty_scores(shape) -> TokenScores:
  return TokenScores(np.zeros(shape, bool), np.zeros(shape, np.float64))


class LMAdapter:
  """A `LanguageModel` (any mixer, DLA included; `Qwen3ForCausalLM` too).

  `segment_len=None` runs each batch in one forward (fine at modest T; attention then holds
  `[T, T]` scores); an int streams rows longer than it through the decode cache in segments of
  that many tokens. Compiled shapes: `length_multiple` (default: `segment_len`, else the chunk
  size) sets the padding of `score_rows`, and the answer positions gathered per call are padded
  to a power of two of at least `min_answer_width`; coarser values mean fewer compilations.
  """

  def __init__(self, model: LanguageModel, *, name: str | None = None,
               segment_len: int | None = None, length_multiple: int | None = None,
               min_answer_width: int = 8):
    if segment_len is not None and segment_len < 1:
      raise ValueError(f"segment_len must be positive or None, got {segment_len}")
    self.model, self.segment_len = model, segment_len
    config = model.config
    self.name = name or f"{type(model).__name__}({config.mixer}, {config.multistate})"
    self.vocab_size = config.vocab_size
    self.length_multiple = length_multiple or segment_len or config.chunk_size
    self.min_answer_width = min_answer_width
    self._graphdef = nnx.graphdef(model)
    self._forward = jax.jit(self._forward_impl)
    self._segment = jax.jit(self._segment_impl)

  def _forward_impl(self, state, tokens, src, targets):
    model = nnx.merge(self._graphdef, state)
    x, _ = model._run_blocks(model._embed(tokens), None, None, keep_cache=False)
    h = jnp.take_along_axis(x, src[..., None], axis=1)
    return _hits_and_nll(model._logits(h), targets)

  def _segment_impl(self, state, cache, tokens, src, targets):
    model = nnx.merge(self._graphdef, state)
    x, (layers, _) = model._run_blocks(model._embed(tokens), cache.layers, cache.pos,
                                       keep_cache=True)
    cache = cache._replace(layers=layers, pos=cache.pos + tokens.shape[1])
    h = jnp.take_along_axis(x, src[..., None], axis=1)
    return cache, _hits_and_nll(model._logits(h), targets)

  def score(self, tokens, answer_mask) -> TokenScores:
    tokens, mask = check_inputs(tokens, answer_mask, self.vocab_size)
    b, t = tokens.shape
    scores = _empty_scores(tokens.shape)
    seg = self.segment_len
    if seg is None or t <= seg:
      src, valid, positions = _answer_table(mask, least=self.min_answer_width)
      targets = np.take_along_axis(tokens, np.minimum(src + 1, t - 1), axis=1)
      hit, nll = jax.device_get(self._forward(nnx.state(self.model), tokens, src, targets))
      for row, p in enumerate(positions):
        _scatter(scores, row, p, hit[row], nll[row])
      return scores
    answered = np.flatnonzero(mask.any(0))
    if not answered.size:
      return scores
    n_segments = -(-int(answered[-1]) // seg)          # the segment holding the last p − 1
    padded = np.zeros((b, n_segments * seg), np.int32)
    padded[:, :min(t, n_segments * seg)] = tokens[:, :n_segments * seg]
    cache = self.model.init_cache(b, n_segments * seg)
    state = nnx.state(self.model)
    for s in range(n_segments):
      lo = s * seg
      src, valid, positions = _answer_table(mask, lo, lo + seg, self.min_answer_width)
      targets = np.take_along_axis(tokens, np.minimum(src + 1, t - 1), axis=1)
      cache, (hit, nll) = self._segment(state, cache, padded[:, lo:lo + seg], src - lo, targets)
      if valid.any():
        hit, nll = jax.device_get((hit, nll))
        for row, p in enumerate(positions):
          _scatter(scores, row, p, hit[row], nll[row])
    return scores


@nnx.jit
def _comet_chunk_scores(model: CometForCausalLM, state, chunk: ChunkLayout, slots, targets):
  """One chunk through all layers (memory injected and updated) -> (state, (hit, nll) at the
  `slots` `[B, K]` of the compact chunk sequence against `targets` `[B, K]`)."""
  params, cell = model.stacked_cells(remat=False)

  def layer(x, inputs):
    layer_params, memory, M = inputs
    y, memory, M = cell(layer_params, x, memory, M, chunk)
    return y, (memory, M)

  y, state = jax.lax.scan(layer, model.backbone._embed(chunk.input_ids), (params, *state))
  h = jnp.take_along_axis(y, slots[..., None], axis=1)
  return state, _hits_and_nll(model.backbone._logits(h), targets)


class CometForCausalLMAdapter:
  """A `CometForCausalLM`, streamed chunk by chunk (module docstring); chunks are the fixed plan
  of `config.chunk_size` tokens (remainder last), as in generation. `length_multiple` (default
  the chunk size) and `min_answer_width` as for `LMAdapter`."""

  def __init__(self, model: CometForCausalLM, *, name: str | None = None,
               length_multiple: int | None = None, min_answer_width: int = 8):
    self.model = model
    self.name = name or "CometForCausalLM"
    self.vocab_size = model.backbone.config.vocab_size
    self.length_multiple = length_multiple or model.config.chunk_size
    self.min_answer_width = min_answer_width

  def score(self, tokens, answer_mask) -> TokenScores:
    tokens, mask = check_inputs(tokens, answer_mask, self.vocab_size)
    b, t = tokens.shape
    scores = _empty_scores(tokens.shape)
    answered = np.flatnonzero(mask.any(0))
    if not answered.size:
      return scores
    c = self.model.config.chunk_size
    last_chunk = (int(answered[-1]) - 1) // c              # holds the last predicting token
    layout = self.model.layout(tokens, layout="uniform")     # [B, N, ...]
    state = self.model.init_memory(b)
    for tau in range(last_chunk + 1):
      chunk = ChunkLayout(*(np.asarray(a)[:, tau] for a in layout))
      lo = tau * c
      src, valid, positions = _answer_table(mask, lo, min(lo + c, t), self.min_answer_width)
      if not valid.any():
        state = advance_memory(self.model, state, jax.tree.map(jnp.asarray, chunk))
        continue
      slots = np.take_along_axis(chunk.text_idx, src - lo, axis=1).astype(np.int32)
      targets = np.take_along_axis(tokens, np.minimum(src + 1, t - 1), axis=1)
      state, (hit, nll) = _comet_chunk_scores(self.model, state,
                                              jax.tree.map(jnp.asarray, chunk), slots, targets)
      hit, nll = jax.device_get((hit, nll))
      for row, p in enumerate(positions):
        _scatter(scores, row, p, hit[row], nll[row])
    return scores


CometAdapter = CometForCausalLMAdapter


class FunctionAdapter:
  """`predict(prefix ids [t] int32) -> next id`, called on the prefix of each answer token only.

  A point prediction has no probabilities: its NLL is 0 when right and log(vocab_size) (a
  uniform guess) when wrong.
  """

  def __init__(self, predict: Callable[[np.ndarray], int], vocab_size: int, *,
               name: str = "function"):
    self.predict, self.vocab_size, self.name = predict, vocab_size, name
    self.length_multiple = 1

  def score(self, tokens, answer_mask) -> TokenScores:
    tokens, mask = check_inputs(tokens, answer_mask, self.vocab_size)
    scores = _empty_scores(tokens.shape)
    for b, t in zip(*np.nonzero(mask)):
      scores.hit[b, t] = int(self.predict(tokens[b, :t])) == int(tokens[b, t])
      scores.nll[b, t] = 0.0 if scores.hit[b, t] else math.log(self.vocab_size)
    return scores


def make_adapter(model, **options) -> ModelAdapter:
  """An adapter for a `LanguageModel` / `CometForCausalLM`; an adapter is returned as is."""
  if isinstance(model, CometForCausalLM):
    return CometForCausalLMAdapter(model, **options)
  if isinstance(model, LanguageModel):
    return LMAdapter(model, **options)
  if isinstance(model, ModelAdapter):
    return model
  raise TypeError(f"no evaluation adapter for {type(model).__name__}")


def score_rows(adapter: ModelAdapter, rows: Sequence[Row], *,
               batch_size: int = 8) -> list[TokenScores]:
  """Scores variable-length rows (module docstring) -> one `TokenScores` of `[n]` arrays per
  row, in order."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  multiple = max(1, adapter.length_multiple)
  groups: dict[int, list[int]] = {}
  for i, (ids, _) in enumerate(rows):
    groups.setdefault(-(-len(ids) // multiple) * multiple, []).append(i)
  out: list[TokenScores | None] = [None] * len(rows)
  for length, members in sorted(groups.items()):
    width = min(batch_size, len(members))     # the last batch is padded: one shape per group
    for start in range(0, len(members), width):
      batch = members[start:start + width]
      tokens = np.zeros((width, length), np.int32)
      mask = np.zeros((width, length), bool)
      for j, i in enumerate(batch):
        ids, answer = rows[i]
        tokens[j, :len(ids)], mask[j, :len(ids)] = ids, answer
      scores = adapter.score(tokens, mask)
      for j, i in enumerate(batch):
        n = len(rows[i][0])
        out[i] = TokenScores(scores.hit[j, :n], scores.nll[j, :n])
  return out


def answer_spans(mask: np.ndarray) -> list[tuple[int, int]]:
  """Maximal runs `[start, end)` of True in a 1-D answer mask: one per answer."""
  mask = np.asarray(mask, bool).astype(np.int8)
  edges = np.diff(np.concatenate([[0], mask, [0]]))
  return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def span_hits(scores: TokenScores, mask: np.ndarray) -> np.ndarray:
  """`[n_spans]` bool: each answer span of the row answered exactly (every token the argmax)."""
  return np.array([bool(scores.hit[a:b].all()) for a, b in answer_spans(mask)], bool)

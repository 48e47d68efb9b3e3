"""Generation for `LanguageModel` (DLA, Log-Linear, Mamba-2, GDN and Transformer LMs).

The prompt runs once through `LanguageModel.prefill` into the decode cache (fixed-size states for
the recurrent and multi-state mixers, a KV cache of prompt + `max_new_tokens` rows for
attention); each new token is then one `decode_step`. Prompts of equal length share one batch
and one compiled loop; a row stops at its first eos (kept) and is padded afterwards.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.models.sampling import check_sampling, eos_tuple, sample_tokens


class LMGeneration(NamedTuple):
  """tokens: `[B, max_new]` int32 generated ids (pad after a row's end); num_tokens: `[B]` (an
  eos that ended the row included)."""
  tokens: np.ndarray
  num_tokens: np.ndarray


@nnx.jit(static_argnames=("max_new", "temperature", "top_p", "eos_ids", "pad_id"))
def _generate_batch(model, prompts, key, *, max_new: int, temperature: float, top_p: float,
                    eos_ids: tuple[int, ...], pad_id: int):
  """prompts `[B, T]` (one length) -> (tokens `[B, max_new]`, num_tokens `[B]`)."""
  logits, cache = model.prefill(prompts, max_len=prompts.shape[1] + max_new)

  def step(carry, index):
    logits, cache, done = carry
    token = sample_tokens(logits, jax.random.fold_in(key, index), temperature=temperature,
                          top_p=top_p)
    token = jnp.where(done, pad_id, token)
    ended = done | jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else done
    logits, cache = model.decode_step(token, cache)
    return (logits, cache, ended), (token, ~done)

  done = jnp.zeros(prompts.shape[0], bool)
  _, (tokens, live) = jax.lax.scan(step, (logits[:, -1], cache, done), jnp.arange(max_new))
  return tokens.T, jnp.sum(live, axis=0, dtype=jnp.int32)


def generate(model, prompt_ids: Sequence[np.ndarray], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None) -> LMGeneration:
  """Continues each prompt by up to `max_new_tokens` tokens; greedy when temperature == 0.

  Args:
    model: a `LanguageModel`. prompt_ids: 1-D int prompts of any lengths (ids in the vocabulary).
    eos_token_id: ends a row when sampled. pad_token_id: fills ended rows (default: the first
      eos id, else 0). seed: sampling key; rows of one prompt length share a batch and the key
      `fold_in(key(seed), length)`, so a prompt's continuation does not depend on the others'.
  """
  check_sampling(max_new_tokens, temperature, top_p)
  rows = [np.asarray(p) for p in prompt_ids]
  for i, row in enumerate(rows):
    if row.ndim != 1 or row.size == 0:
      raise ValueError(f"prompt {i} must be a non-empty 1-D array of ids, got shape {row.shape}")
    model._check_tokens(row[None], rank=2)
  eos_ids = eos_tuple(eos_token_id)
  pad_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
  tokens = np.full((len(rows), max_new_tokens), pad_id, np.int32)
  num_tokens = np.zeros(len(rows), np.int32)
  for length in sorted({row.size for row in rows}):
    members = [i for i, row in enumerate(rows) if row.size == length]
    batch = jnp.asarray(np.stack([rows[i] for i in members]), jnp.int32)
    key = jax.random.fold_in(jax.random.key(seed), length)
    new, count = _generate_batch(model, batch, key, max_new=max_new_tokens,
                                 temperature=float(temperature), top_p=float(top_p),
                                 eos_ids=eos_ids, pad_id=int(pad_id))
    tokens[members], num_tokens[members] = np.asarray(new), np.asarray(count)
  return LMGeneration(tokens, num_tokens)

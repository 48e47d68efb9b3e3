"""Token sampling shared by the decoders: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def check_sampling(max_new_tokens, temperature: float, top_p: float) -> None:
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")


def eos_tuple(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
  if eos_token_id is None:
    return ()
  return (int(eos_token_id),) if isinstance(eos_token_id, int) else tuple(map(int, eos_token_id))


def sample_tokens(logits, key, *, temperature: float, top_p: float):
  """logits `[B, V]` → ids `[B]`: greedy when temperature == 0, else temperature + nucleus
  sampling over the smallest set of tokens whose probability reaches top_p."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    outside = jnp.cumsum(probs, axis=-1) - probs >= top_p            # never the first token
    sorted_logits = jnp.where(outside, -jnp.inf, sorted_logits)
    logits = jnp.full_like(logits, -jnp.inf).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

"""Decoder-only language model with stacked, scanned layers and a decode cache."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.layers import RMSNorm
from dlax.models.block import Block
from dlax.models.config import ModelConfig


class ModelCache(NamedTuple):
  layers: Any       # the mixers' caches, stacked on a leading [n_layers] axis
  pos: jax.Array    # int32 scalar: number of tokens already processed


class LanguageModel(nnx.Module):
  """Token embedding, `n_layers` pre-norm blocks (parameters stacked on a leading [L] axis and run
  with `lax.scan`, rematerialised when `config.remat`), final RMSNorm and an (un)tied head.

  Logits are fp32 (fp64 when computing in fp64). With `config.multistate`, the Mamba-2 / GDN
  cores are Log-Linear attention or DLA and the decode cache holds their fixed-size states.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, vocab = config.d_model, config.vocab_size
    init = nnx.initializers.normal(config.init_std)
    self.embedding = nnx.Param(init(rngs.params(), (vocab, d), config.params_dtype))

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(d, eps=config.norm_eps, param_dtype=config.params_dtype)
    self.head = None if config.tie_embeddings else nnx.Linear(
        d, vocab, use_bias=False, kernel_init=init, dtype=config.compute_dtype,
        param_dtype=config.params_dtype, preferred_element_type=self._logits_dtype, rngs=rngs)

  @property
  def _logits_dtype(self) -> jnp.dtype:
    return jnp.promote_types(self.config.compute_dtype, jnp.float32)

  def __call__(self, tokens, *, return_metrics: bool = False):
    """tokens `[B, T]` int -> logits `[B, T, V]` (a fresh sequence; no cache kept).

    With `return_metrics`, returns `(logits, metrics)`: for DLA models a dict of fp32
    `[n_layers, H]` arrays ("boundary_rate", "mean_block_length", "occupancy", "merges"; see
    `dlax.layers.decision_metrics`), an empty dict otherwise.
    """
    self._check_tokens(tokens, rank=2)
    x, (_, metrics) = self._run_blocks(self._embed(tokens), None, None, keep_cache=False,
                                       return_metrics=return_metrics)
    logits = self._logits(x)
    return (logits, metrics) if return_metrics else logits

  def init_cache(self, batch_size: int, max_len: int) -> ModelCache:
    """Empty cache for `batch_size` sequences of up to `max_len` tokens (`max_len` is used by
    attention only: the recurrent, Log-Linear and DLA states have fixed sizes). Every mixer's
    empty cache is all zeros, so only its shapes are traced."""
    graphdef, state = nnx.split(self.blocks)

    def one_layer(state):
      block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
      return block.init_cache(batch_size, max_len, self.config.compute_dtype)

    shapes = jax.eval_shape(one_layer, state)
    layers = jax.tree.map(lambda s: jnp.zeros((self.config.n_layers, *s.shape), s.dtype), shapes)
    return ModelCache(layers=layers, pos=jnp.zeros((), jnp.int32))

  def prefill(self, tokens, max_len: int | None = None):
    """tokens `[B, T]` -> (logits `[B, T, V]`, cache); `max_len` (default T + 256) bounds the
    total length for attention's KV cache."""
    self._check_tokens(tokens, rank=2)
    b, t = tokens.shape
    cache = self.init_cache(b, t + 256 if max_len is None else max_len)
    return self._extend(tokens, cache)

  def decode_step(self, token, cache: ModelCache):
    """token `[B]` -> (logits `[B, V]`, cache advanced by one position)."""
    self._check_tokens(token, rank=1)
    logits, cache = self._extend(token[:, None], cache)
    return logits[:, 0], cache

  def _extend(self, tokens, cache: ModelCache):
    self._check_capacity(cache, tokens.shape[1])
    x, (layers, _) = self._run_blocks(self._embed(tokens), cache.layers, cache.pos,
                                      keep_cache=True)
    return self._logits(x), ModelCache(layers=layers, pos=cache.pos + tokens.shape[1])

  def _run_blocks(self, x, caches, pos, *, keep_cache: bool, return_metrics: bool = False,
                  kv_mask=None):
    """Scans the stacked blocks over x `[B, T, d]`; caches are stacked per layer (or None);
    `kv_mask` (`[B, T]` bool) hides padded keys from attention.

    Returns (x, (new caches or None, metrics stacked per layer or {})).
    """
    graphdef, state = nnx.split(self.blocks)

    def body(x, layer):
      layer_state, cache = layer
      x, cache, *metrics = nnx.merge(graphdef, layer_state)(x, cache=cache, pos=pos,
                                                            kv_mask=kv_mask,
                                                            return_metrics=return_metrics)
      return x, (cache if keep_cache else None, metrics[0] if metrics else {})

    if self.config.remat:
      body = jax.checkpoint(body)
    return jax.lax.scan(body, x, (state, caches))

  def _embed(self, tokens):
    """Out-of-range ids (reachable only under jit) embed to NaN instead of being clamped; the NaN
    then spreads through that sequence's outputs."""
    vocab = self.config.vocab_size
    table = self.embedding[...].astype(self.config.compute_dtype)
    ids = jnp.where(tokens >= 0, tokens, vocab)          # `take` would wrap negative ids
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)

  def _logits(self, x):
    h = self.final_norm(x)
    if self.head is not None:
      return self.head(h).astype(self._logits_dtype)
    table = self.embedding[...].astype(h.dtype)
    return jnp.einsum("btd,vd->btv", h, table, preferred_element_type=self._logits_dtype)

  def _check_tokens(self, tokens, *, rank: int) -> None:
    layout = "[B, T]" if rank == 2 else "[B]"
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array, got dtype {dtype}")
    if tokens.ndim != rank:
      raise ValueError(f"tokens must have rank {rank} {layout}, got shape {tokens.shape}")
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
      return
    lo, hi = int(np.min(tokens)), int(np.max(tokens))
    vocab = self.config.vocab_size
    if lo < 0 or hi >= vocab:
      raise ValueError(f"token ids must lie in [0, {vocab}) for vocab_size={vocab}; "
                       f"got ids in [{lo}, {hi}]")

  def _check_capacity(self, cache: ModelCache, num_tokens: int) -> None:
    """Attention's KV cache has a fixed length; writing past it would be clamped silently."""
    if self.config.mixer != "attention" or isinstance(cache.pos, jax.core.Tracer):
      return
    max_len = cache.layers.k.shape[2]
    if int(cache.pos) + num_tokens > max_len:
      raise ValueError(f"KV cache holds {max_len} tokens; cannot add {num_tokens} at position "
                       f"{int(cache.pos)} (pass a larger max_len)")

"""Causal softmax attention with RoPE, grouped-query heads and a KV cache."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dlax.layers.initializers import dense
from dlax.layers.norms import RMSNorm


class KVCache(NamedTuple):
  k: jax.Array   # [B, Tmax, KV, hd]
  v: jax.Array   # [B, Tmax, KV, hd]


def apply_rope(x, positions, *, theta: float):
  """Rotary embedding, rotate-half form. x `[B, T, H, hd]`, positions `[T]` or `[B, T]` int.

  Angles are computed in at least fp32; returns x's dtype.
  """
  acc = jnp.promote_types(x.dtype, jnp.float32)
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=acc) / half)             # [hd/2]
  angles = positions.astype(acc)[..., None] * inv_freq                   # [(B,) T, hd/2]
  cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # [(B,) T, 1, hd/2]
  x1, x2 = jnp.split(x.astype(acc), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_attention(q, k, v, q_positions, k_positions, kv_mask=None):
  """Softmax attention where query i sees keys with `k_pos ≤ q_pos`; softmax in at least fp32.

  Args:
    q: `[B, T, H, hd]`. k, v: `[B, S, KV, hd]` with H a multiple of KV (grouped-query).
    q_positions: `[T]` or per-row `[B, T]` int. k_positions: `[S]` int.
    kv_mask: optional `[B, S]` bool, False for keys no query may see (padding). A query that
      sees no key at all attends uniformly to every key (its output is then meaningless).

  Returns:
    `[B, T, H, hd]` in q's dtype.
  """
  b, t, h, hd = q.shape
  kv = k.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  q = q.reshape(b, t, kv, h // kv, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=acc) * hd ** -0.5
  mask = k_positions <= q_positions[..., None]                           # [(B,) T, S]
  mask = mask[:, None, None] if mask.ndim == 3 else mask                  # [B, 1, 1, T, S]
  if kv_mask is not None:
    mask = mask & kv_mask[:, None, None, None, :]
  probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(acc).min), axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=acc)
  return out.reshape(b, t, h, hd).astype(q.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with RoPE and GQA: `[B, T, d] -> [B, T, d]`."""

  def __init__(self, d_model: int, *, num_heads: int = 16, num_kv_heads: int = 16,
               head_dim: int = 96, rope_theta: float = 5e5, qk_norm: bool = False,
               implementation: str | None = None, init_std: float = 0.02,
               norm_eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"Attention: num_heads {num_heads} is not divisible by num_kv_heads "
                       f"{num_kv_heads}")
    if head_dim % 2:
      raise ValueError(f"Attention: RoPE needs an even head_dim, got {head_dim}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.implementation = implementation
    kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense(d_model, num_heads * head_dim, **kw)
    self.k_proj = dense(d_model, num_kv_heads * head_dim, **kw)
    self.v_proj = dense(d_model, num_kv_heads * head_dim, **kw)
    self.o_proj = dense(num_heads * head_dim, d_model, **kw)
    norm = lambda: RMSNorm(head_dim, eps=norm_eps, param_dtype=param_dtype)
    self.q_norm = norm() if qk_norm else None
    self.k_norm = norm() if qk_norm else None

  def init_cache(self, batch_size: int, max_len: int, dtype) -> KVCache:
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  def __call__(self, x, *, cache: KVCache | None = None, pos=None, kv_mask=None,
               return_metrics: bool = False):
    """x `[B, T, d]` -> (y `[B, T, d]`, cache after this call), plus `{}` (no metrics) when
    `return_metrics`.

    x holds positions `pos .. pos+T−1` (pos: int32 scalar, default 0, or `[B]` per row). With
    `cache=None` it attends to itself only and the returned cache holds its T keys and values;
    with a cache (length Tmax) it is written at `pos` and queries attend to every cached key up to
    their own position (pos is then the number of tokens already cached in that row). `kv_mask`
    (`[B, T]` bool, only without a cache) hides padded keys. With `implementation` set (no cache),
    `jax.nn.dot_product_attention` runs instead, and kv_mask must then be a prefix mask (row b sees
    keys `[0, n_b)`), which it becomes as key lengths.
    """
    if kv_mask is not None and cache is not None:
      raise ValueError("Attention: kv_mask is supported without a cache only")
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    start = jnp.zeros((), jnp.int32) if pos is None else jnp.asarray(pos, jnp.int32)
    positions = start[..., None] + jnp.arange(t, dtype=jnp.int32)         # [T] or [B, T]
    q = apply_rope(q, positions, theta=self.rope_theta)
    k = apply_rope(k, positions, theta=self.rope_theta)

    if cache is None:
      new_cache = KVCache(k=k, v=v)
    else:
      zero = jnp.zeros((), jnp.int32)
      write_row = lambda buf, new, s: jax.lax.dynamic_update_slice(
          buf, new.astype(buf.dtype), (s, zero, zero))                    # [Tmax, KV, hd]
      write = (jax.vmap(write_row) if start.ndim else
               lambda buf, new, s: jax.vmap(write_row, (0, 0, None))(buf, new, s))
      new_cache = KVCache(k=write(cache.k, k, start), v=write(cache.v, v, start))
    if cache is None and self.implementation is not None:
      lengths = None if kv_mask is None else jnp.sum(kv_mask, axis=-1, dtype=jnp.int32)
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                       implementation=self.implementation)
    else:
      k_positions = (positions if cache is None
                     else jnp.arange(cache.k.shape[1], dtype=jnp.int32))
      o = causal_attention(q, new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype),
                           positions, k_positions, kv_mask)
    y = self.o_proj(o.reshape(b, t, -1))
    return (y, new_cache, {}) if return_metrics else (y, new_cache)

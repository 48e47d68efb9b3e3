"""Fenwick-tree level bookkeeping of Log-Linear Attention (spec dla.md §3), shared by every impl.

The level of the pair (t, s), s ≤ t, on absolute positions is

    ℓ(t, s) = 0 if s = t else 1 + ⌊log₂(t XOR s)⌋  =  bit_length(t XOR s).

A `LogLinearState` keeps one `[Dk, Dv]` state per level. Before step t ≥ 1 the levels carry like a
binary counter: levels below `ℓ(t, t − 1)` (= 1 + the trailing one-bits of t − 1) are summed into
level `ℓ(t, t − 1)`. The same carry on chunk indices drives the chunk-level cascade of the chunked
form, because with C = 2^p aligned chunks `ℓ(t, s) = p + ℓ(n, m)` for tokens of chunks n > m.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

LEVELS_MAX = 32             # supports 2^31 tokens: ℓ(t, s) ≤ 31 for t, s < 2^31


class LogLinearState(NamedTuple):
  """Per-level states of Log-Linear Attention after `pos` tokens.

  Attributes:
    S: `[B, H, levels, Dk, Dv]` fp32 (fp64 in references); level ℓ sums the transported writes of
      the tokens s with ℓ(pos − 1, s) = ℓ.
    pos: `[B]` int32 number of tokens consumed (the absolute position of the next token). A state
      at pos 0 must be empty.
  """

  S: jax.Array
  pos: jax.Array

  @classmethod
  def empty(cls, batch: int, heads: int, dk: int, dv: int, levels: int = LEVELS_MAX,
            dtype=jnp.float32) -> LogLinearState:
    return cls(S=jnp.zeros((batch, heads, levels, dk, dv), dtype),
               pos=jnp.zeros((batch,), jnp.int32))

  @property
  def levels(self) -> int:
    return self.S.shape[2]


def max_positions(levels: int) -> int:
  """Number of absolute positions whose pair levels fit in `levels` levels (and in int32)."""
  return min(2 ** (levels - 1), 2 ** 31)


def _bit_length(x):
  """Bits needed to write x ≥ 0 (0 for x = 0)."""
  return jnp.iinfo(x.dtype).bits - jax.lax.clz(x)


def fenwick_level(t, s):
  """Elementwise ℓ(t, s) = bit_length(t XOR s) for integer positions s ≤ t (broadcasting)."""
  t, s = jnp.broadcast_arrays(jnp.asarray(t), jnp.asarray(s))
  return _bit_length(t ^ s)


def fenwick_levels(t_positions, s_positions):
  """Level map `ℓ[..., i, j] = ℓ(t_i, s_j)` of query positions `[..., T]` and key positions
  `[..., S]` (absolute, integer). Returns `[..., T, S]` int; meaningful where s_j ≤ t_i."""
  t_positions, s_positions = jnp.asarray(t_positions), jnp.asarray(s_positions)
  return fenwick_level(t_positions[..., :, None], s_positions[..., None, :])


def carry_level(index):
  """Level `ℓ(index, index − 1)` that receives the carry before step `index`; 0 (no carry) at 0."""
  index = jnp.asarray(index)
  return jnp.where(index >= 1, fenwick_level(index, index - 1), 0)


def _batch_mask(mask, like):
  """`[B]` mask reshaped to broadcast against `like` `[B, ...]`."""
  return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def fenwick_carry(states, index):
  """Binary-counter carry before step `index`: levels below `carry_level(index)` are summed into it.

  states `[B, H, L, Dk, Dv]`, index `[B]` int (a token or chunk index). A target past the last
  level is clamped to it, so nothing is dropped. Returns `[B, H, L, Dk, Dv]`.
  """
  num_levels = states.shape[2]
  target = jnp.minimum(carry_level(index), num_levels - 1)[:, None, None, None, None]
  level = jnp.arange(num_levels, dtype=target.dtype)[None, None, :, None, None]
  below = level < target
  merged = jnp.sum(jnp.where(below, states, 0.0), axis=2, keepdims=True)
  return jnp.where(below, 0.0, states) + jnp.where(level == target, merged, 0.0)


def level_weights(lam, levels):
  """Readout weights `λ[..., min(level, L − 1)]` (levels past the last weight reuse it).

  lam `[..., X, L]`, levels int broadcastable to `[..., X, Y]`. Returns `[..., X, Y]`.
  """
  num_weights = lam.shape[-1]
  levels = jnp.minimum(jnp.asarray(levels), num_weights - 1)
  shape = jnp.broadcast_shapes(lam.shape[:-1], levels.shape[:-1]) + levels.shape[-1:]
  return jnp.take_along_axis(lam, jnp.broadcast_to(levels, shape), axis=-1)


def bin_by_level(k_hat, v, levels, num_levels: int):
  """Sums per-token writes `K̂[s] v_sᵀ` into the level of each token.

  k_hat `[B, H, S, Dk]`, v `[B, H, S, Dv]`, levels `[B, S]` int (tokens with a level outside
  [0, num_levels) are dropped). Returns `[B, H, num_levels, Dk, Dv]`.
  """
  member = levels[:, None, :] == jnp.arange(num_levels, dtype=levels.dtype)[None, :, None]
  return jnp.einsum("bls,bhsk,bhsv->bhlkv", member.astype(k_hat.dtype), k_hat, v)


def where_batch(mask, new, old):
  """Per batch row: `new` where `mask [B]`, else `old` (pytrees of `[B, ...]` arrays)."""
  return jax.tree.map(lambda a, b: jnp.where(_batch_mask(mask, a), a, b), new, old)

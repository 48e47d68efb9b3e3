"""DLA cache and decision pytrees (spec dla.md §5.3–5.4)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class DLACache(NamedTuple):
  """Fixed-capacity, chronologically ordered cache of block states (slot 0 = oldest).

  Attributes:
    S: `[B, H, K, Dk, Dv]` slot states (fp32, fp64 in references); slots >= m are zero.
    n: `[B, H, K]` int32 tokens per block.
    info: `[B, H, K]` summed information scores Ī of each block.
    lo: `[B, H, K]` int32 absolute start position of each block.
    m: `[B, H]` int32 number of live slots (0 = empty).
    open_sq: `[B, H]` ‖S_open‖².
    total_sq: `[B, H]` ‖Σ_i S_i‖² (used by `score_ref="total"`).
    pos: `[B]` int32 number of tokens consumed.
  """

  S: jax.Array
  n: jax.Array
  info: jax.Array
  lo: jax.Array
  m: jax.Array
  open_sq: jax.Array
  total_sq: jax.Array
  pos: jax.Array

  @classmethod
  def empty(cls, batch: int, heads: int, capacity: int, dk: int, dv: int,
            dtype=jnp.float32) -> "DLACache":
    scalars = (batch, heads, capacity)
    return cls(
        S=jnp.zeros((*scalars, dk, dv), dtype),
        n=jnp.zeros(scalars, jnp.int32),
        info=jnp.zeros(scalars, dtype),
        lo=jnp.zeros(scalars, jnp.int32),
        m=jnp.zeros((batch, heads), jnp.int32),
        open_sq=jnp.zeros((batch, heads), dtype),
        total_sq=jnp.zeros((batch, heads), dtype),
        pos=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def capacity(self) -> int:
    return self.S.shape[2]


class DLADecisions(NamedTuple):
  """Per-token bookkeeping, returned with `return_aux=True` and accepted as `decisions=`.

  Attributes:
    boundary: `[B, T, H]` bool, b_t (token t opens a new state).
    score: `[B, T, H]` information score I_t (τ for a token that meets an empty cache).
    merge_idx: `[B, T, H]` int32 index i* of the merged adjacent pair (i*, i*+1), or -1.
    num_slots: `[B, T, H]` int32 number of live slots m after the step.
  """

  boundary: jax.Array
  score: jax.Array
  merge_idx: jax.Array
  num_slots: jax.Array

"""The recurrent core of the Mamba-2 and Gated DeltaNet mixers: one state, Log-Linear or DLA.

A mixer computes the op inputs (q, k, v, g, β) and, in a multi-state mode, λ-logits `W_λ x` of
shape `[B, T, H·Kλ]` (spec dla.md §3, §4.5, §8). `MultiStateCore` maps the logits to readout
weights `λ = softplus(L ⊙ logits)` and runs the op selected by its mode:

| mode | op | state (layer cache field) | Kλ |
|---|---|---|---|
| "none" | `ssd` (β None) / `gated_delta` | `[B, H, Dk, Dv]` | 0 |
| "log_linear" | `log_linear_attention` | `LogLinearState` (32 levels: any length) | `num_levels` |
| "dla" | `dla_attention` | `DLACache` (K slots) | `num_lambda` (default K) |

A call of T = 1 tokens with a state runs the op's decode step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dlax.layers.initializers import state_dtype
from dlax.ops import (DLACache, DLADecisions, LogLinearState, dla_attention, dla_step,
                      gated_delta, gated_delta_step, log_linear_attention, log_linear_step, ssd,
                      ssd_step)
from dlax.ops.dla.op import SCORE_REFS

Multistate = Literal["none", "log_linear", "dla"]
MULTISTATE_MODES: tuple[str, ...] = ("none", "log_linear", "dla")
METRIC_NAMES: tuple[str, ...] = ("boundary_rate", "mean_block_length", "occupancy", "merges")
LAMBDA_INIT_STD = 0.006           # W_λ ~ N(0, 0.006²), so λ ≈ softplus(0) ≈ 0.69 at init


def _fail(config, message: str):
  raise ValueError(f"{type(config).__name__}: {message}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DLAConfig:
  """DLA options (spec dla.md §4, §5.1): capacity K ≥ 2, Kλ = `num_lambda` (None → K) readout
  weights by recency rank, boundary threshold τ, score reference and score constants."""
  capacity: int = 30
  num_lambda: int | None = None
  tau: float = 0.6
  score_ref: str = "open"
  eps: float = 1e-6
  eps_r: float = 1e-6

  def __post_init__(self):
    if not _is_int(self.capacity) or self.capacity < 2:
      _fail(self, f"capacity must be an int >= 2, got {self.capacity!r}")
    if self.num_lambda is not None and (not _is_int(self.num_lambda)
                                        or not 1 <= self.num_lambda <= self.capacity):
      _fail(self, f"num_lambda must be None or an int in [1, capacity={self.capacity}], got "
            f"{self.num_lambda!r}")
    if math.isnan(self.tau):
      _fail(self, "tau must not be NaN")
    if self.score_ref not in SCORE_REFS:
      _fail(self, f"score_ref must be one of {SCORE_REFS}, got {self.score_ref!r}")
    if not (self.eps > 0 and self.eps_r > 0):
      _fail(self, f"eps and eps_r must be positive, got {self.eps}, {self.eps_r}")

  @property
  def lambda_count(self) -> int:
    """Kλ: the number of λ weights per head."""
    return self.capacity if self.num_lambda is None else self.num_lambda


@dataclasses.dataclass(frozen=True)
class LogLinearConfig:
  """Log-Linear options (spec dla.md §3): one λ weight per Fenwick level, `num_levels` of them
  (⌈log₂T⌉ + 1 levels cover T tokens: 15 at 16K); older levels reuse the last weight."""
  num_levels: int = 15

  def __post_init__(self):
    if not _is_int(self.num_levels) or self.num_levels < 1:
      _fail(self, f"num_levels must be a positive int, got {self.num_levels!r}")


class LambdaScale(nnx.Param):
  """`L ∈ R^{H×Kλ}` of `λ = softplus(L ⊙ W_λ x)`: initialised to ones, excluded from weight decay
  (filter on this type when building the optimizer mask)."""


def decision_metrics(aux: DLADecisions, capacity: int) -> dict[str, jax.Array]:
  """Per-head statistics of DLA's decisions over one call, averaged over the batch.

  Args:
    aux: `DLADecisions` with `[B, T, H]` fields (all T tokens are valid).
    capacity: K.

  Returns:
    fp32 `[H]` arrays: `boundary_rate` (mean of b_t), `mean_block_length` (T / number of
    boundaries, per sequence), `occupancy` (mean of m_t / K) and `merges` (capacity merges per
    sequence).
  """
  boundaries = jnp.sum(aux.boundary.astype(jnp.float32), axis=1)                 # [B, H]
  t = aux.boundary.shape[1]
  return {
      "boundary_rate": jnp.mean(boundaries, axis=0) / t,
      "mean_block_length": jnp.mean(t / jnp.maximum(boundaries, 1.0), axis=0),
      "occupancy": jnp.mean(aux.num_slots.astype(jnp.float32), axis=(0, 1)) / capacity,
      "merges": jnp.mean(jnp.sum((aux.merge_idx >= 0).astype(jnp.float32), axis=1), axis=0),
  }


class MultiStateCore(nnx.Module):
  """Runs the base op, Log-Linear attention or DLA on per-head inputs (see the module docstring).

  Holds `lam_scale` (`LambdaScale`, `[H, Kλ]`, fp32) in the multi-state modes, nothing otherwise.
  `unit_lambda=True` forces λ ≡ 1 (a test hook: the model then equals its base model).
  """

  def __init__(self, mode: Multistate, *, num_heads: int, chunk_size: int = 64,
               impl: str = "chunked", dla: DLAConfig | None = None,
               log_linear: LogLinearConfig | None = None, unit_lambda: bool = False,
               param_dtype=jnp.float32):
    if mode not in MULTISTATE_MODES:
      raise ValueError(f"MultiStateCore: mode must be one of {MULTISTATE_MODES}, got {mode!r}")
    self.mode, self.num_heads = mode, num_heads
    self.chunk_size, self.impl, self.unit_lambda = chunk_size, impl, unit_lambda
    self.dla = DLAConfig() if dla is None else dla
    self.log_linear = LogLinearConfig() if log_linear is None else log_linear
    self.num_lambda = {"none": 0, "log_linear": self.log_linear.num_levels,
                       "dla": self.dla.lambda_count}[mode]
    self.lam_scale = (LambdaScale(jnp.ones((num_heads, self.num_lambda),
                                           state_dtype(param_dtype)))
                      if self.num_lambda else None)

  def init_state(self, batch_size: int, dk: int, dv: int, dtype):
    """The state of a fresh sequence (its shape does not depend on the length)."""
    acc, h = state_dtype(dtype), self.num_heads
    if self.mode == "dla":
      return DLACache.empty(batch_size, h, self.dla.capacity, dk, dv, acc)
    if self.mode == "log_linear":
      return LogLinearState.empty(batch_size, h, dk, dv, dtype=acc)
    return jnp.zeros((batch_size, h, dk, dv), acc)

  def readout_weights(self, lam_logits):
    """λ-logits `[..., H·Kλ]` -> λ `[..., H, Kλ]` = softplus(L ⊙ logits), fp32 (or fp64)."""
    shape = (*lam_logits.shape[:-1], self.num_heads, self.num_lambda)
    acc = self.lam_scale.dtype
    if self.unit_lambda:
      return jnp.ones(shape, acc)
    return jax.nn.softplus(self.lam_scale[...] * lam_logits.astype(acc).reshape(shape))

  def __call__(self, q, k, v, g, lam_logits=None, beta=None, *, scale: float, state=None,
               return_metrics: bool = False):
    """Runs the core over T tokens.

    Args:
      q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g, beta: `[B, T, H]` (beta None for Mamba-2).
      lam_logits: `[B, T, H·Kλ]` (ignored in mode "none").
      scale: query scale.
      state: the state to continue from (see `init_state`), or None for a fresh sequence.
      return_metrics: also return DLA's per-head `decision_metrics` (`{}` in the other modes).

    Returns:
      (o `[B, T, H, Dv]`, state after the call), plus the metrics dict when `return_metrics`.
      With impl="masked", DLA keeps no state and returns None.
    """
    step = state is not None and q.shape[1] == 1
    lam = None if self.mode == "none" else self.readout_weights(lam_logits)
    inputs = (q, k, v, g, lam, beta)
    if step:
      inputs = jax.tree.map(lambda a: a[:, 0], inputs)
    run = {"none": self._base, "log_linear": self._log_linear, "dla": self._dla}[self.mode]
    o, state, aux = run(*inputs, scale=scale, state=state, step=step)
    if step:
      o, aux = jax.tree.map(lambda a: a[:, None], (o, aux))
    if not return_metrics:
      return o, state
    return o, state, {} if aux is None else decision_metrics(aux, self.dla.capacity)

  def _base(self, q, k, v, g, lam, beta, *, scale, state, step):
    del lam
    gates = (g,) if beta is None else (g, beta)
    if step:
      o, state = (ssd_step if beta is None else gated_delta_step)(q, k, v, *gates, state,
                                                                   scale=scale)
    else:
      o, state = (ssd if beta is None else gated_delta)(
          q, k, v, *gates, scale=scale, initial_state=state, chunk_size=self.chunk_size,
          impl=self.impl)
    return o, state, None

  def _log_linear(self, q, k, v, g, lam, beta, *, scale, state, step):
    if step:
      o, state = log_linear_step(q, k, v, g, lam, state, beta, scale=scale)
    else:
      o, state = log_linear_attention(q, k, v, g, lam, beta, scale=scale, initial_state=state,
                                      chunk_size=self.chunk_size, impl=self.impl)
    return o, state, None

  def _dla(self, q, k, v, g, lam, beta, *, scale, state, step):
    c = self.dla
    options = dict(tau=c.tau, capacity=c.capacity, scale=scale, score_ref=c.score_ref, eps=c.eps,
                   eps_r=c.eps_r)
    if step:
      return dla_step(q, k, v, g, lam, state, beta, return_aux=True, **options)
    if self.impl == "masked":                  # the O(T²) reference keeps no cache
      o, aux = dla_attention(q, k, v, g, lam, beta, initial_cache=state, impl="masked",
                             return_aux=True, **options)
      return o, None, aux
    return dla_attention(q, k, v, g, lam, beta, initial_cache=state, chunk_size=self.chunk_size,
                         impl=self.impl, return_cache=True, return_aux=True, **options)

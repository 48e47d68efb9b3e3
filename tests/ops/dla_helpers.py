"""DLA test helpers: random inputs, jitted op adapters, float64 numpy oracles of the backbone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from _helpers import Inputs, random_inputs
from dlax.ops import DLACache, dla_attention, dla_step, gated_delta, ssd

BACKBONES = ("mamba2", "gdn")
STATIC = ("capacity", "chunk_size", "score_ref", "return_cache", "return_aux", "impl")

dla = jax.jit(dla_attention, static_argnames=STATIC)
step = jax.jit(dla_step, static_argnames=("capacity", "score_ref", "return_aux"))


def make_inputs(rng, b, t, h, dk, dv, klam, *, backbone, dtype=jnp.float64):
  """(Inputs, lam): random q, k, v, g, β (GDN: L2-normalised k, β = sigmoid(normal)), and
  random positive λ `[B, T, H, Kλ]` in [0.2, 1.5]."""
  x = random_inputs(rng, b, t, h, dk, dv, with_beta=backbone == "gdn", dtype=dtype)
  lam = jnp.asarray(rng.uniform(0.2, 1.5, (b, t, h, klam)), x.g.dtype)
  return x, lam


def run(x: Inputs, lam, *, return_cache=False, return_aux=False, **kwargs):
  """`dla_attention` (jitted) on an `Inputs` bundle.

  Always compiles the variant returning everything (one compilation per configuration) and
  selects the requested outputs like the op does.
  """
  full_cache = kwargs.get("impl", "chunked") != "masked"
  o, *rest = dla(x.q, x.k, x.v, x.g, lam, x.beta, return_cache=full_cache, return_aux=True,
                 **kwargs)
  cache, aux = rest if full_cache else (None, rest[0])
  outputs = (o,) + ((cache,) if return_cache else ()) + ((aux,) if return_aux else ())
  return outputs[0] if len(outputs) == 1 else outputs


def run_step(x_t: Inputs, lam_t, cache, **kwargs):
  return step(x_t.q, x_t.k, x_t.v, x_t.g, lam_t, cache, x_t.beta, **kwargs)


def at(x: Inputs, index) -> Inputs:
  """Time slice of every input (`index` an int or a slice)."""
  return x.map(lambda a: a[:, index])


def step_loop(x: Inputs, lam, *, capacity, cache=None, **kwargs):
  """Runs `dla_step` token by token. Returns (o `[B, T, H, Dv]`, caches, records) where
  caches[t] / records[t] are the cache and decision record after token t."""
  b, t, h, dk = x.q.shape
  if cache is None:
    cache = DLACache.empty(b, h, capacity, dk, x.v.shape[-1], jnp.float64)
  outs, caches, records = [], [], []
  for i in range(t):
    o, cache, record = run_step(at(x, i), lam[:, i], cache, capacity=capacity, return_aux=True,
                                **kwargs)
    outs.append(o)
    caches.append(cache)
    records.append(record)
  return jnp.stack(outs, axis=1), caches, records


@jax.jit
def base_op(x: Inputs, scale=1.0):
  """The backbone alone (recurrent oracle): (o, final state)."""
  if x.beta is None:
    return ssd(x.q, x.k, x.v, x.g, scale=scale, impl="recurrent")
  return gated_delta(x.q, x.k, x.v, x.g, x.beta, scale=scale, impl="recurrent")


def np_transition(state, x: Inputs, t: int):
  """`A_t(S)` in numpy: state `[B, H, Dk, Dv]`."""
  alpha = np.exp(np.asarray(x.g[:, t]))[..., None, None]
  if x.beta is None:
    return alpha * state
  k = np.asarray(x.k[:, t])
  beta = np.asarray(x.beta[:, t])[..., None, None]
  response = np.einsum("bhk,bhkv->bhv", k, state)
  return alpha * (state - beta * k[..., :, None] * response[..., None, :])


def np_write(x: Inputs, t: int):
  """`w_t = k vᵀ` (or `β k vᵀ`): `[B, H, Dk, Dv]`."""
  c = np.asarray(x.k[:, t])[..., :, None] * np.asarray(x.v[:, t])[..., None, :]
  return c if x.beta is None else np.asarray(x.beta[:, t])[..., None, None] * c


def np_transport(state, x: Inputs, start: int, end: int):
  """`Φ_{start→end}(S) = A_end ∘ … ∘ A_{start+1}(S)`."""
  for r in range(start + 1, end + 1):
    state = np_transition(state, x, r)
  return state


def np_base_states(x: Inputs):
  """Base states `G_t` after each token: `[T, B, H, Dk, Dv]` (float64 numpy)."""
  b, t, h, dk = x.q.shape
  state = np.zeros((b, h, dk, x.v.shape[-1]))
  states = []
  for i in range(t):
    state = np_transition(state, x, i) + np_write(x, i)
    states.append(state)
  return np.stack(states)


def np_attention_matrix(x: Inputs, *, scale=1.0):
  """`A_base[b, h, t, s] = scale · β_s q_tᵀ Φ_{s→t} k_s` (β = 1 for Mamba-2): `[B, H, T, T]`."""
  b, t, h, dk = x.q.shape
  q, k = np.asarray(x.q), np.asarray(x.k)
  beta = np.ones((b, t, h)) if x.beta is None else np.asarray(x.beta)
  a = np.zeros((b, h, t, t))
  for s in range(t):
    unit = beta[:, s, :, None, None] * k[:, s, :, :, None]                # β_s k_s (Dv = 1)
    for i in range(s, t):
      unit = unit if i == s else np_transition(unit, x, i)
      a[:, :, i, s] = scale * np.einsum("bhk,bhk->bh", q[:, i], unit[..., 0])
  return a


def total_merges(aux) -> int:
  return int(np.sum(np.asarray(aux.merge_idx) >= 0))


def boundary_rate(aux) -> float:
  return float(np.mean(np.asarray(aux.boundary)))

"""`dla_attention` / `dla_step`: Dynamic Linear Attention (spec dla.md §5), one op, three backends.

`impl="recurrent"` is the token-by-token oracle, `impl="masked"` the O(T²) form `(A_base ⊙ Λ) V`,
and `impl="chunked"` (the default) the chunk-parallel algorithm of §7 in `dlax.ops.dla.chunked`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dlax.ops.common import (Impl, accumulator_dtype, check_chunk_size, check_inputs, is_tracer,
                             kernel, resolve_impl)
from dlax.ops.dla.bookkeeping import replay_blocks, segment_resets
from dlax.ops.dla.chunked import dla_chunked
from dlax.ops.dla.naive import cast_cache, dla_masked, dla_recurrent, dla_step_reference
from dlax.ops.dla.types import DLACache, DLADecisions

SCORE_REFS: tuple[str, ...] = ("open", "total")
DECISION_GRADS: tuple[str, ...] = ("none", "straight_through")


def _fail(op: str, message: str):
  raise ValueError(f"{op}: {message}")


def _check_capacity(op: str, capacity) -> None:
  if not isinstance(capacity, int) or isinstance(capacity, bool):
    _fail(op, f"capacity must be a Python int, got {type(capacity).__name__}")
  if capacity < 2:
    _fail(op, f"capacity must be >= 2, got {capacity}")


def _check_options(op: str, capacity, score_ref) -> None:
  _check_capacity(op, capacity)
  if score_ref not in SCORE_REFS:
    _fail(op, f"score_ref must be one of {SCORE_REFS}, got {score_ref!r}")


def _check_lam(op: str, lam, batch_shape: tuple[int, ...], capacity: int) -> None:
  layout = "[B, T, H, Klam]" if len(batch_shape) == 3 else "[B, H, Klam]"
  if lam.ndim != len(batch_shape) + 1 or lam.shape[:-1] != batch_shape:
    _fail(op, f"lam must have shape {layout} with leading dims {batch_shape}, got {lam.shape}")
  if not jnp.issubdtype(lam.dtype, jnp.floating):
    _fail(op, f"lam must be floating point, got {lam.dtype}")
  if not 1 <= lam.shape[-1] <= capacity:
    _fail(op, f"lam's last dim Klam must be in [1, capacity={capacity}], got {lam.shape[-1]}")


def _check_cache(op: str, cache, b: int, h: int, capacity: int, dk: int, dv: int) -> None:
  if not isinstance(cache, DLACache):
    _fail(op, f"cache must be a DLACache, got {type(cache).__name__}")
  if cache.S.shape[2:3] != (capacity,):
    _fail(op, f"cache capacity {cache.S.shape[2:3]} does not match capacity={capacity}")
  expected = {"S": (b, h, capacity, dk, dv), "n": (b, h, capacity), "info": (b, h, capacity),
              "lo": (b, h, capacity), "m": (b, h), "open_sq": (b, h), "total_sq": (b, h),
              "pos": (b,)}
  for field, shape in expected.items():
    if getattr(cache, field).shape != shape:
      _fail(op, f"cache.{field} must have shape {shape}, got {getattr(cache, field).shape}")


def _check_decisions(op: str, decisions, shape: tuple[int, ...], name: str = "decisions") -> None:
  if not isinstance(decisions, DLADecisions):
    _fail(op, f"{name} must be a DLADecisions, got {type(decisions).__name__}")
  for field in DLADecisions._fields:
    if getattr(decisions, field).shape != shape:
      _fail(op, f"{name}.{field} must have shape {shape}, got {getattr(decisions, field).shape}")
  if not jnp.issubdtype(decisions.merge_idx.dtype, jnp.integer):
    _fail(op, f"{name}.merge_idx must be integer, got {decisions.merge_idx.dtype}")


def _check_decisions_legal(op: str, decisions: DLADecisions, capacity: int, segment_ids,
                           initial_cache: DLACache | None) -> None:
  """Debug mode (§5.4): an injected boundary must be set on an empty cache, and an injected merge
  must happen iff b_t = 1 and the cache is full, at an adjacent pair 0..K−2."""
  arrays = (decisions.boundary, decisions.merge_idx, segment_ids,
            *(() if initial_cache is None else (initial_cache.m,)))
  if any(is_tracer(a) for a in arrays if a is not None):
    _fail(op, "debug=True checks the injected decisions eagerly; call it outside jit/vmap")
  cache = {} if initial_cache is None else dict(
      lo0=initial_cache.lo, m0=initial_cache.m, pos0=initial_cache.pos)
  _, _, boundary, merge_idx = replay_blocks(
      decisions.boundary, decisions.merge_idx, capacity=capacity,
      resets=None if segment_ids is None else segment_resets(segment_ids), **cache)
  given_b, given_idx = np.asarray(decisions.boundary, bool), np.asarray(decisions.merge_idx)
  bad = (given_b != np.asarray(boundary)) | (given_idx != np.asarray(merge_idx))
  if bad.any():
    b_, t_, h_ = (int(i[0]) for i in np.nonzero(bad))
    _fail(op, f"illegal injected decision at batch {b_}, token {t_}, head {h_}: boundary="
          f"{bool(given_b[b_, t_, h_])}, merge_idx={int(given_idx[b_, t_, h_])}; a merge "
          f"(0..K−2) must happen iff the token is a boundary and the cache holds K={capacity} "
          "slots, and a token meeting an empty cache must be a boundary")


def _check_segment_ids(op: str, segment_ids, b: int, t: int) -> None:
  if segment_ids.shape != (b, t):
    _fail(op, f"segment_ids must have shape {(b, t)} ([B, T]), got {segment_ids.shape}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    _fail(op, f"segment_ids must be integer, got {segment_ids.dtype}")


def dla_attention(q, k, v, g, lam, beta=None, *, tau=0.6, capacity: int = 30,
                  chunk_size: int = 64, scale: float = 1.0, score_ref: str = "open",
                  eps: float = 1e-6, eps_r: float = 1e-6, initial_cache: DLACache | None = None,
                  segment_ids=None, decisions: DLADecisions | None = None,
                  return_cache: bool = False, return_aux: bool = False, impl: Impl = "chunked",
                  remat_every: int = 8, debug: bool = False, decision_grad: str = "none",
                  temperature: float = 0.1):
  """Dynamic Linear Attention over a sequence (spec dla.md §4.6, §5.1).

  Args:
    q, k: `[B, T, H, Dk]` (GDN: L2-normalised keys). v: `[B, T, H, Dv]`.
    g: `[B, T, H]` log-decay (≤ 0), float32/float64.
    lam: `[B, T, H, Kλ]` non-negative readout weights by recency rank, 1 ≤ Kλ ≤ capacity.
    beta: `[B, T, H]` selects the gated delta rule (GDN); None selects Mamba-2's `k vᵀ` write.
    tau: boundary threshold τ. capacity: K ≥ 2 (static). chunk_size: C ≥ 1 (static, chunked).
    scale: query scale. score_ref: "open" (open-slot drift) or "total" (base-state drift).
    eps, eps_r: score constants.
    initial_cache: optional `DLACache` to continue from (not with impl="masked").
    segment_ids: optional `[B, T]` int; a change of id empties the cache before the token.
    decisions: optional `DLADecisions` (`[B, T, H]` fields) forcing boundaries and merges.
    return_cache, return_aux: also return the final `DLACache` / the `DLADecisions` record.
    impl: "chunked" (XLA), "recurrent" (oracle), "masked" (O(T²) reference), "pallas_triton" /
      "pallas_tpu" (kernels, with `dla_chunked`'s signature; interpret mode on CPU), or None:
      the platform's kernel on GPU/TPU, else "chunked".
    remat_every: chunked only; chunks per `jax.checkpoint` group (§7.3): the backward pass
      keeps one cache per group and recomputes the chunks inside it.
    debug: check eagerly that injected `decisions` are legal (§5.4) instead of legalising them.
    decision_grad: "none" (hard decisions, no gradient; the library default) or
      "straight_through" (impl="masked" only, for small ablations: hard forward, and the
      relaxed-rank gradient of §4.3 with `p_u = σ((I_u − τ)/temperature)`).

  Returns:
    o `[B, T, H, Dv]` in v's dtype, followed by the cache and/or aux when requested, in that
    order. The cache and the scores are fp32 (fp64 for fp64 inputs).
  """
  op = "dla_attention"
  impl = resolve_impl(op, impl, "dla")
  check_chunk_size(op, chunk_size)
  check_inputs(op, q, k, v, g, beta=beta)
  _check_options(op, capacity, score_ref)
  b, t, h, dk = q.shape
  _check_lam(op, lam, (b, t, h), capacity)
  if segment_ids is not None:
    _check_segment_ids(op, segment_ids, b, t)
  if initial_cache is not None:
    _check_cache(op, initial_cache, b, h, capacity, dk, v.shape[-1])
  if decisions is not None:
    _check_decisions(op, decisions, (b, t, h))
    if debug:
      _check_decisions_legal(op, decisions, capacity, segment_ids, initial_cache)
  options = dict(tau=tau, capacity=capacity, scale=scale, score_ref=score_ref, eps=eps,
                 eps_r=eps_r, segment_ids=segment_ids, decisions=decisions)

  if decision_grad not in DECISION_GRADS:
    _fail(op, f"decision_grad must be one of {DECISION_GRADS}, got {decision_grad!r}")
  if decision_grad == "straight_through" and impl != "masked":
    _fail(op, "decision_grad='straight_through' exists only in the O(T²) masked reference; "
          "use impl='masked'")
  if impl == "masked":
    if initial_cache is not None or return_cache:
      _fail(op, "impl='masked' supports neither initial_cache nor return_cache; "
            "use impl='chunked' or impl='recurrent' for streaming")
    o, aux = dla_masked(q, k, v, g, lam, beta, decision_grad=decision_grad,
                        temperature=temperature, **options)
    cache = None
  elif impl == "recurrent":
    o, cache, aux = dla_recurrent(q, k, v, g, lam, beta, initial_cache=initial_cache, **options)
  else:
    chunked = dla_chunked if impl == "chunked" else kernel("dla", impl)
    o, cache, aux = chunked(q, k, v, g, lam, beta, chunk_size=chunk_size,
                            initial_cache=initial_cache, remat_every=remat_every, **options)
  outputs = (o,) + ((cache,) if return_cache else ()) + ((aux,) if return_aux else ())
  return outputs[0] if len(outputs) == 1 else outputs


def dla_step(q, k, v, g, lam, cache: DLACache, beta=None, *, tau=0.6, capacity: int | None = None,
             scale: float = 1.0, score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6,
             decision: DLADecisions | None = None, return_aux: bool = False):
  """One decode step of DLA: exactly one iteration of §4.6 (spec dla.md §5.2). Cost O(K·Dk·Dv).

  Args:
    q, k: `[B, H, Dk]`. v: `[B, H, Dv]`. g, beta: `[B, H]`. lam: `[B, H, Kλ]`.
    cache: `DLACache` (e.g. `DLACache.empty(B, H, K, Dk, Dv)` for a fresh sequence).
    capacity: K; defaults to the cache's, and must match it when given.
    decision: optional `DLADecisions` of `[B, H]` arrays forcing the boundary and merge.
    return_aux: also return this token's `DLADecisions` record (`[B, H]` fields).
    Other arguments as in `dla_attention`.

  Returns:
    (o `[B, H, Dv]` in v's dtype, new cache), plus the record when `return_aux`.
  """
  op = "dla_step"
  check_inputs(op, q, k, v, g, beta=beta, step=True)
  if not isinstance(cache, DLACache):
    _fail(op, f"cache must be a DLACache, got {type(cache).__name__}")
  capacity = cache.capacity if capacity is None else capacity
  _check_options(op, capacity, score_ref)
  b, h, dk = q.shape
  _check_cache(op, cache, b, h, capacity, dk, v.shape[-1])
  _check_lam(op, lam, (b, h), capacity)
  if decision is not None:
    _check_decisions(op, decision, (b, h), name="decision")
  acc = accumulator_dtype(q, k, v, g, lam, beta, cache.S)
  o, cache, record = dla_step_reference(q, k, v, g, lam, cast_cache(cache, acc), beta, tau=tau,
                                        scale=scale, score_ref=score_ref, eps=eps, eps_r=eps_r,
                                        decision=decision)
  o = o.astype(v.dtype)
  return (o, cache, record) if return_aux else (o, cache)

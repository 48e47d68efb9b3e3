"""Backend-neutral parts of the DLA kernels (spec dla.md §4–7), in XLA: the rank maps and block
membership, the bookkeeping inputs, and the driver `run`, which strings a backend's two Pallas
kernels together (`dla_triton`: Triton, `dla_tpu`: Mosaic). The per-chunk quantities, the score
formulas, the cache types and the slot helpers are the XLA path's own (`dlax.ops.dla.chunk_math`,
`scores`, `types`, `bookkeeping`: small pure functions the kernels share with it).

Shapes: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`, lam `[B, T, H, Kλ]`; K slots,
chunks of C tokens, N = ⌈T/C⌉ (the tail is padded with g = 0, k = v = 0 and excluded from the
decisions). Per call, chunks laid out `[B, H, N, C, ·]`:

  1. chunk math (`dlax.ops.dla.chunk_math`, differentiable): A_in, A_kk, Q̃, K̃′, K̂, Kγ, γ_end.
  2. bookkeeping (a backend kernel, under stop_gradient): scores, boundaries, merges and the
     block layout after every token. Decisions only need one reference state (the open slot,
     or the base state), so this runs ahead of the K-slot pass.
  3. rank maps and block membership (`slot_maps`, parallel over chunks, §7.2 step 2):
     `Λ_in[i,s] = lam[i, min(#{j<m_i : lo_i[j] > s}, Kλ−1)]`, `Λ_pre[i,j]` likewise for the
     pre-chunk slot starts, `W = Λ_in ⊙ A_in`, the chunk-end block of every token and the range
     of pre-chunk slots merged into each chunk-end block.
  4. readout and slot-state pass (a backend kernel with a `custom_vjp`): o and the final slot
     states.

With segment resets, every pair term is masked to the same segment and Q̃, K̃′ are zero from the
first reset on. Gradients reach q, k, v, g, beta through 1 and 3 (JAX autodiff of XLA), lam
through the gathers of 3, and the initial slot states through 4; decisions carry none (spec
§4.3 "none").
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dlax.ops.dla.bookkeeping import segment_resets, take_slot
from dlax.ops.dla.chunk_math import ChunkMath, chunk_math
from dlax.ops.dla.naive import cast_cache
from dlax.ops.dla.types import DLACache, DLADecisions


class Options(NamedTuple):
  """Static options of one call."""
  tau: float
  capacity: int
  scale: float
  score_ref: str
  eps: float
  eps_r: float


class Book(NamedTuple):
  """Scalar carry of the bookkeeping per (batch, head): `[..., K]` slot metadata, `[...]`
  scalars."""
  m: jax.Array
  n: jax.Array
  info: jax.Array
  lo: jax.Array
  open_sq: jax.Array
  total_sq: jax.Array


class Layout(NamedTuple):
  """Bookkeeping results `[B, H, N, C(, K)]`, and the layout at each chunk start."""
  boundary: jax.Array
  score: jax.Array
  merge_idx: jax.Array
  num_slots: jax.Array
  lo_hist: jax.Array          # [B, H, N, C, K] block starts after each token
  lo_start: jax.Array         # [B, H, N, K] block starts at the chunk start
  m_start: jax.Array          # [B, H, N] live slots at the chunk start


class SlotInputs(NamedTuple):
  """Differentiable inputs of the slot pass, per (batch·head) `[BH, N, ...]` (k_gamma: None for
  Mamba-2)."""
  q_tilde: jax.Array      # [BH, N, C, Dk]
  k_hat: jax.Array        # [BH, N, C, Dk]
  k_gamma: jax.Array | None
  end_decay: jax.Array    # [BH, N]
  w: jax.Array            # [BH, N, C, C]
  v: jax.Array            # [BH, N, C, Dv]
  lam_pre: jax.Array      # [BH, N, K, C]
  s0: jax.Array           # [BH, K, Dk, Dv] initial slot states


class SlotLayout(NamedTuple):
  """Block layout per chunk (int32, no gradient)."""
  counts: jax.Array       # [BH, N, 2]: live slots at the chunk start and end
  first: jax.Array        # [BH, N, K+1]: pre-chunk slots first[b] ≤ j < first[b+1] -> block b
  blk: jax.Array          # [BH, N, C]: chunk-end block of each token (−1: padding)


class Kernels(NamedTuple):
  """A backend's kernels for `run`.

  bookkeeping(opts, inputs, book, ref_state, pos0, *, heads, length) -> (final Book `[BH, (K)]`,
    Layout `[BH, N, ...]`); inputs as made by `book_inputs` (`[BH, N, ...]`, per batch
    `resets [B, N, C]`), book `[BH, (K)]`, ref_state `[BH, Dk, Dv]`, pos0 `[B]`.
  slot_pass(x: SlotInputs, layout: SlotLayout) -> (o `[BH, N, C, Dv]`, final slot states
    `[BH, K, Dk, Dv]`), differentiable in x.
  """
  bookkeeping: Callable
  slot_pass: Callable


# --- layout glue ---------------------------------------------------------------------------------


def check_options(backend: str, lam, capacity, chunk_size, score_ref) -> None:
  """The checks every backend shares; errors read `dla (<backend>): ...`."""
  def fail(message):
    raise ValueError(f"dla ({backend}): {message}")

  if not isinstance(capacity, int) or capacity < 2:
    fail(f"capacity must be an int >= 2, got {capacity!r}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    fail(f"chunk_size must be a positive int, got {chunk_size!r}")
  if score_ref not in ("open", "total"):
    fail(f"score_ref must be 'open' or 'total', got {score_ref!r}")
  if not 1 <= lam.shape[-1] <= capacity:
    fail(f"lam's last dim Klam must be in [1, capacity={capacity}], got {lam.shape[-1]}")


def to_chunks(x, chunk: int, heads: bool = True):
  """`[B, T, (H), ...]` -> zero-padded `[B, (H), N, C, ...]`."""
  if x is None:
    return None
  pad = -x.shape[1] % chunk
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, chunk, *x.shape[2:])                     # [B, N, C, (H), ...]
  return jnp.moveaxis(x, 3, 1) if heads else x


def from_chunks(x, t: int):
  """`[B, H, N, C, ...]` -> `[B, T, H, ...]` (drops the padded tail)."""
  x = jnp.moveaxis(x, 1, 3)                                              # [B, N, C, H, ...]
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def flat(x):
  """`[B, H, ...]` -> `[B·H, ...]`."""
  return None if x is None else x.reshape(-1, *x.shape[2:])


def _ranks(lo_hist, m_hist, positions):
  """`#{j < m_i : lo_i[j] > p}`: lo_hist `[..., C, K]`, m_hist `[..., C]`, positions `[..., P]`
  (broadcasting against the leading axes) -> `[..., C, P]` int32."""
  live = jnp.arange(lo_hist.shape[-1]) < m_hist[..., None]
  newer = lo_hist[..., None, :] > positions[..., None, :, None]
  return jnp.sum(newer & live[..., None, :], axis=-1, dtype=jnp.int32)


def _lam_weights(lam, ranks):
  """`lam[i, min(rank, Kλ−1)]`: lam `[..., C, Kλ]`, ranks `[..., C, P]` -> `[..., C, P]`."""
  return jnp.take_along_axis(lam, jnp.minimum(ranks, lam.shape[-1] - 1), axis=-1)


def _block_of(lo, m, positions):
  """Index of the live block holding each position (−1 if none): lo `[..., K]`, m `[...]`,
  positions `[..., P]` -> `[..., P]`."""
  live = jnp.arange(lo.shape[-1]) < m[..., None]
  started = (lo[..., None, :] <= positions[..., None]) & live[..., None, :]
  return jnp.sum(started, axis=-1, dtype=jnp.int32) - 1


def slot_maps(layout: Layout, lam, a_in, positions, valid):
  """λ weights and block membership of every chunk (§7.2 step 2), `[B, H, N, ...]`.

  Returns (W = Λ_in ⊙ A_in `[.., C, C]`, Λ_pre `[.., K, C]`, counts `[.., 2]`, first `[.., K+1]`,
  blk `[.., C]`).
  """
  k = layout.lo_hist.shape[-1]
  lam_in = _lam_weights(lam, _ranks(layout.lo_hist, layout.num_slots, positions))
  lam_pre = _lam_weights(lam, _ranks(layout.lo_hist, layout.num_slots, layout.lo_start))
  pre_live = jnp.arange(k) < layout.m_start[..., None]                   # [B, H, N, K]
  lam_pre = jnp.where(pre_live[..., None, :], lam_pre, 0.0)
  lo_end, m_end = layout.lo_hist[..., -1, :], layout.num_slots[..., -1]
  blk = jnp.where(valid, _block_of(lo_end, m_end, positions), -1)
  target = jnp.where(pre_live, _block_of(lo_end, m_end, layout.lo_start), -1)
  first = jnp.sum((target[..., None, :] >= 0) & (target[..., None, :] < jnp.arange(k + 1)[:, None]),
                  axis=-1, dtype=jnp.int32)
  counts = jnp.stack([layout.m_start, m_end], axis=-1).astype(jnp.int32)
  return lam_in * a_in, jnp.swapaxes(lam_pre, -1, -2), counts, first, blk


def book_inputs(opts: Options, cm: ChunkMath, v, g, beta, k, decisions, chunk: int) -> dict:
  """State-free inputs of the bookkeeping kernels, `[B·H, N, ...]`: k_tilde, k_hat `[.., C, Dk]`,
  k_gamma (GDN), end_decay `[BH, N]`, v `[.., C, Dv]`, scalars `[.., 4, C]` (α, β, ‖k‖², ‖v‖²),
  rows `[.., C, C]` (open: A_kk for GDN, A_kk ⊙ V Vᵀ for Mamba-2) or r_in = A_kk V `[.., C, Dv]`
  (total), forced `[.., 2, C]` int (injected boundary, merge index) or None."""
  ones = jnp.ones_like(g)
  scalars = jnp.stack([jnp.exp(g), ones if beta is None else beta, jnp.sum(k * k, -1),
                       jnp.sum(v * v, -1)], axis=-2)                     # [B, H, N, 4, C]
  inputs = dict(k_tilde=cm.k_tilde, k_hat=cm.k_hat, k_gamma=cm.k_gamma, end_decay=cm.end_decay,
                v=v, scalars=scalars)
  if opts.score_ref == "open":
    inputs["rows"] = cm.a_kk if beta is not None else cm.a_kk * jnp.einsum("...iv,...sv->...is",
                                                                          v, v)
  else:
    inputs["r_in"] = jnp.einsum("...is,...sv->...iv", cm.a_kk, v)
  if decisions is not None:
    inputs["forced"] = jnp.stack([to_chunks(decisions.boundary.astype(jnp.int32), chunk),
                                  to_chunks(decisions.merge_idx.astype(jnp.int32), chunk)],
                                 axis=-2)
  return {name: flat(a) for name, a in inputs.items()}


# --- the driver ------------------------------------------------------------------------------


def run(kernels: Kernels, q, k, v, g, lam, beta=None, *, tau, capacity: int, chunk_size: int,
        scale: float, score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6,
        initial_cache=None, segment_ids=None, decisions=None):
  """Chunked DLA on a backend's kernels; arguments and results as `dla_chunked` (spec §5.1):
  (o `[B, T, H, Dv]` in v's dtype, final `DLACache`, `DLADecisions` record).

  The XLA parts run their fp32 matmuls at full precision (no TF32 / bf16 passes), so that fp32
  results match the float64 reference to ~1e-6.
  """
  with jax.default_matmul_precision("highest"):
    return _run(kernels, q, k, v, g, lam, beta, tau=tau, capacity=capacity,
                chunk_size=chunk_size, scale=scale, score_ref=score_ref, eps=eps, eps_r=eps_r,
                initial_cache=initial_cache, segment_ids=segment_ids, decisions=decisions)


def _run(kernels: Kernels, q, k, v, g, lam, beta, *, tau, capacity, chunk_size, scale,
         score_ref, eps, eps_r, initial_cache, segment_ids, decisions):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  acc = jnp.result_type(jnp.float32, q, k, v, g, lam, *(() if beta is None else (beta,)))
  cache = (DLACache.empty(b, h, capacity, dk, dv, acc) if initial_cache is None
           else cast_cache(initial_cache, acc))
  opts = Options(tau=tau, capacity=capacity, scale=scale, score_ref=score_ref, eps=eps,
                 eps_r=eps_r)

  qc, kc, vc, lamc = (to_chunks(x.astype(acc), c) for x in (q, k, v, lam))
  gc, betac = (None if x is None else to_chunks(x.astype(acc), c) for x in (g, beta))
  n_chunks = qc.shape[2]
  resets = None if segment_ids is None else to_chunks(segment_resets(segment_ids), c, False)
  valid = (jnp.arange(n_chunks * c) < t).reshape(n_chunks, c)
  cm = chunk_math(qc, kc, gc, betac, None if resets is None else resets[:, None], scale=scale)

  inputs = book_inputs(opts, cm, vc, gc, betac, kc, decisions, c)
  if resets is not None:
    inputs["resets"] = resets.astype(jnp.int32)
  if score_ref == "open":
    ref_state = jnp.where((cache.m > 0)[..., None, None], take_slot(cache.S, cache.m - 1), 0.0)
  else:
    ref_state = jnp.sum(cache.S, axis=2)
  book0 = Book(m=cache.m, n=cache.n, info=cache.info, lo=cache.lo, open_sq=cache.open_sq,
               total_sq=cache.total_sq)
  book, layout = kernels.bookkeeping(opts, inputs, Book(*(flat(a) for a in book0)),
                                     flat(ref_state), cache.pos, heads=h, length=t)
  book = Book(*(a.reshape(b, h, *a.shape[1:]) for a in book))
  layout = Layout(*(a.reshape(b, h, *a.shape[1:]) for a in layout))

  positions = (cache.pos[:, None, None, None] + jnp.arange(n_chunks * c).reshape(n_chunks, c))
  w, lam_pre, counts, first, blk = slot_maps(layout, lamc, cm.a_in, positions, valid)
  x = SlotInputs(q_tilde=cm.q_tilde, k_hat=cm.k_hat, k_gamma=cm.k_gamma, end_decay=cm.end_decay,
                 w=w, v=vc, lam_pre=lam_pre, s0=cache.S)
  o, states = kernels.slot_pass(SlotInputs(*(flat(a) for a in x)),
                                SlotLayout(*(flat(a) for a in (counts, first, blk))))
  o = from_chunks(o.reshape(b, h, n_chunks, c, dv), t).astype(v.dtype)
  states = states.reshape(b, h, capacity, dk, dv)

  final = DLACache(S=states, n=book.n, info=book.info, lo=book.lo, m=book.m,
                   open_sq=jnp.sum(take_slot(states, book.m - 1) ** 2, axis=(-2, -1)),
                   total_sq=jnp.sum(jnp.sum(states, axis=2) ** 2, axis=(-2, -1)),
                   pos=cache.pos + t)
  record = DLADecisions(*(from_chunks(a, t) for a in (layout.boundary, layout.score,
                                                      layout.merge_idx, layout.num_slots)))
  return o, final, record

"""DLA (Dynamic Linear Attention, spec dla.md §4–7) with Triton-lowered Pallas kernels.

`dla(q, k, v, g, lam, beta, ...)` has the signature and results of `dlax.ops.dla.chunked.
dla_chunked`: (o `[B, T, H, Dv]` in v's dtype, final cache, decision record), with the cache and
record as NamedTuples with the fields of `DLACache` / `DLADecisions` (kernels do not import dlax).

Shapes: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`, lam `[B, T, H, Kλ]`; K slots,
chunks of C tokens, N = ⌈T/C⌉ (the tail is padded with g = 0, k = v = 0 and excluded from the
decisions). Per call, chunks laid out `[B, H, N, C, ·]`:

  1. chunk math (XLA, differentiable; `dla_triton_chunk`): A_in, A_kk, Q̃, K̃′, K̂, Kγ, γ_end.
  2. bookkeeping (Pallas, `dla_triton_book`, one program per (batch, head) looping over chunks
     and tokens, under stop_gradient): scores, boundaries, merges and the block layout after
     every token. Decisions only need one reference state (the open slot, or the base state),
     so this runs ahead of the K-slot pass.
  3. rank maps and block membership (XLA, parallel over chunks, §7.2 step 2):
     `Λ_in[i,s] = lam[i, min(#{j<m_i : lo_i[j] > s}, Kλ−1)]`, `Λ_pre[i,j]` likewise for the
     pre-chunk slot starts, `W = Λ_in ⊙ A_in`, the chunk-end block of every token and the range
     of pre-chunk slots merged into each chunk-end block.
  4. readout and slot-state pass (Pallas, `dla_triton_slots`, forward and backward kernels under
     a `custom_vjp`): o and the slot states at every chunk end. The forward keeps the slot
     states of every `remat_every`-th chunk start; the backward recomputes a group's states from
     its checkpoint (§7.3), so the residual is `⌈N/remat_every⌉·K·Dk·Dv` per head.

Gradients reach q, k, v, g, beta (through 1 and 3, by JAX autodiff of the XLA parts), lam (through
the gathers of 3) and the initial slot states; decisions carry none (spec §4.3 "none").

Kernels take fp32/bf16 inputs and compute in fp32 (fp64 inputs run in fp64, interpret mode only).
Compiled, C and the head dims must be powers of two in [16, 256]; interpret mode (off GPU) takes
any sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dlax_kernels.common import triton_interpret
from dlax_kernels.dla_triton_book import Book, Layout, Options, bookkeeping, take_slot
from dlax_kernels.dla_triton_chunk import chunk_math
from dlax_kernels.dla_triton_slots import SlotConfig, SlotInputs, SlotLayout, slot_pass

_COMPILED_DTYPES = (jnp.bfloat16, jnp.float32)
_MIN_DIM, _MAX_DIM = 16, 256


class Cache(NamedTuple):
  """The fields of `dlax.ops.DLACache` (spec §5.3), same order."""
  S: jax.Array
  n: jax.Array
  info: jax.Array
  lo: jax.Array
  m: jax.Array
  open_sq: jax.Array
  total_sq: jax.Array
  pos: jax.Array


class Decisions(NamedTuple):
  """The fields of `dlax.ops.DLADecisions` (spec §5.4), same order, `[B, T, H]`."""
  boundary: jax.Array
  score: jax.Array
  merge_idx: jax.Array
  num_slots: jax.Array


def _fail(message: str):
  raise ValueError(f"dla (pallas_triton): {message}")


def _is_power_of_2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _check(q, v, lam, capacity, chunk_size, score_ref, interpret: bool) -> None:
  if not isinstance(capacity, int) or capacity < 2:
    _fail(f"capacity must be an int >= 2, got {capacity!r}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    _fail(f"chunk_size must be a positive int, got {chunk_size!r}")
  if score_ref not in ("open", "total"):
    _fail(f"score_ref must be 'open' or 'total', got {score_ref!r}")
  if not 1 <= lam.shape[-1] <= capacity:
    _fail(f"lam's last dim Klam must be in [1, capacity={capacity}], got {lam.shape[-1]}")
  if interpret:
    return
  if not (_is_power_of_2(chunk_size) and _MIN_DIM <= chunk_size <= _MAX_DIM):
    _fail(f"chunk_size must be a power of two in [{_MIN_DIM}, {_MAX_DIM}] on GPU, "
          f"got {chunk_size}")
  for name, dim in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
    if not (_is_power_of_2(dim) and _MIN_DIM <= dim <= _MAX_DIM):
      _fail(f"head dim {name} must be a power of two in [{_MIN_DIM}, {_MAX_DIM}] on GPU, "
            f"got {dim}")
  for name, x in (("q", q), ("v", v)):
    if x.dtype not in _COMPILED_DTYPES:
      _fail(f"{name} must be bfloat16 or float32 on GPU, got {x.dtype}")


def _to_chunks(x, chunk: int, heads: bool = True):
  """`[B, T, (H), ...]` -> zero-padded `[B, (H), N, C, ...]`."""
  if x is None:
    return None
  pad = -x.shape[1] % chunk
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, chunk, *x.shape[2:])                     # [B, N, C, (H), ...]
  return jnp.moveaxis(x, 3, 1) if heads else x


def _from_chunks(x, t: int):
  """`[B, H, N, C, ...]` -> `[B, T, H, ...]` (drops the padded tail)."""
  x = jnp.moveaxis(x, 1, 3)                                              # [B, N, C, H, ...]
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _segment_resets(segment_ids):
  """`[B, T]`: the token's segment id differs from the previous token's (never token 0)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def _empty_cache(b, h, k, dk, dv, dtype) -> Cache:
  return Cache(S=jnp.zeros((b, h, k, dk, dv), dtype), n=jnp.zeros((b, h, k), jnp.int32),
               info=jnp.zeros((b, h, k), dtype), lo=jnp.zeros((b, h, k), jnp.int32),
               m=jnp.zeros((b, h), jnp.int32), open_sq=jnp.zeros((b, h), dtype),
               total_sq=jnp.zeros((b, h), dtype), pos=jnp.zeros((b,), jnp.int32))


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


def _slot_maps(layout: Layout, lam, a_in, positions, valid):
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


def _book_inputs(opts: Options, cm, v, g, beta, k, decisions, chunk: int) -> dict:
  """State-free inputs of the bookkeeping kernel, `[B·H, N, ...]` (see `bookkeeping`)."""
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
    inputs["forced"] = jnp.stack([_to_chunks(decisions.boundary.astype(jnp.int32), chunk),
                                  _to_chunks(decisions.merge_idx.astype(jnp.int32), chunk)],
                                 axis=-2)
  return {name: _flat(a) for name, a in inputs.items()}


def _flat(x):
  """`[B, H, ...]` -> `[B·H, ...]`."""
  return None if x is None else x.reshape(-1, *x.shape[2:])


def dla(q, k, v, g, lam, beta=None, *, tau, capacity: int, chunk_size: int, scale: float,
        score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6, initial_cache=None,
        segment_ids=None, decisions=None, remat_every: int = 8):
  """Chunked DLA on Pallas kernels; arguments and results as `dla_chunked` (spec §5.1).

  `initial_cache` / `decisions` may be any NamedTuples with the fields of DLACache /
  DLADecisions. `remat_every`: chunks per checkpoint group of the slot states (the backward
  recomputes the states inside a group). The XLA parts run their fp32 matmuls at full precision
  (no TF32), so that fp32 results match the float64 reference to ~1e-6.
  """
  with jax.default_matmul_precision("highest"):
    return _dla(q, k, v, g, lam, beta, tau=tau, capacity=capacity, chunk_size=chunk_size,
                scale=scale, score_ref=score_ref, eps=eps, eps_r=eps_r,
                initial_cache=initial_cache, segment_ids=segment_ids, decisions=decisions,
                remat_every=remat_every)


def _dla(q, k, v, g, lam, beta, *, tau, capacity, chunk_size, scale, score_ref, eps, eps_r,
         initial_cache, segment_ids, decisions, remat_every):
  """`dla` under full matmul precision."""
  interpret = triton_interpret()
  _check(q, v, lam, capacity, chunk_size, score_ref, interpret)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  acc = jnp.result_type(jnp.float32, q, k, v, g, lam, *(() if beta is None else (beta,)))
  cache = (_empty_cache(b, h, capacity, dk, dv, acc) if initial_cache is None
           else Cache(*initial_cache))
  cache = cache._replace(S=cache.S.astype(acc), info=cache.info.astype(acc),
                         open_sq=cache.open_sq.astype(acc), total_sq=cache.total_sq.astype(acc))
  opts = Options(tau=tau, capacity=capacity, scale=scale, score_ref=score_ref, eps=eps,
                 eps_r=eps_r)

  qc, kc, vc, lamc = (_to_chunks(x.astype(acc), c) for x in (q, k, v, lam))
  gc, betac = (None if x is None else _to_chunks(x.astype(acc), c) for x in (g, beta))
  n_chunks = qc.shape[2]
  resets = None if segment_ids is None else _to_chunks(_segment_resets(segment_ids), c, False)
  valid = (jnp.arange(n_chunks * c) < t).reshape(n_chunks, c)
  cm = chunk_math(qc, kc, gc, betac, None if resets is None else resets[:, None], scale=scale)

  inputs = _book_inputs(opts, cm, vc, gc, betac, kc, decisions, c)
  if resets is not None:
    inputs["resets"] = resets.astype(jnp.int32)
  if score_ref == "open":
    ref_state = jnp.where((cache.m > 0)[..., None, None], take_slot(cache.S, cache.m - 1), 0.0)
  else:
    ref_state = jnp.sum(cache.S, axis=2)
  book0 = Book(m=cache.m, n=cache.n, info=cache.info, lo=cache.lo, open_sq=cache.open_sq,
               total_sq=cache.total_sq)
  book, layout = bookkeeping(opts, inputs, Book(*(_flat(a) for a in book0)), _flat(ref_state),
                             cache.pos, heads=h, length=t, interpret=interpret)
  book = Book(*(a.reshape(b, h, *a.shape[1:]) for a in book))
  layout = Layout(*(a.reshape(b, h, *a.shape[1:]) for a in layout))

  positions = (cache.pos[:, None, None, None] + jnp.arange(n_chunks * c).reshape(n_chunks, c))
  w, lam_pre, counts, first, blk = _slot_maps(layout, lamc, cm.a_in, positions, valid)
  cfg = SlotConfig(gdn=beta is not None, block_v=_block_v(dv), group=remat_every,
                   interpret=interpret,
                   num_warps=4 if dk <= 64 else 8)
  x = SlotInputs(q_tilde=cm.q_tilde, k_hat=cm.k_hat, k_gamma=cm.k_gamma, end_decay=cm.end_decay,
                 w=w, v=vc, lam_pre=lam_pre, s0=cache.S)
  x = SlotInputs(*(_flat(a) for a in x))
  o, states = slot_pass(cfg, x, SlotLayout(*(_flat(a) for a in (counts, first, blk))))
  o = _from_chunks(o.reshape(b, h, n_chunks, c, dv), t).astype(v.dtype)
  states = states.reshape(b, h, capacity, dk, dv)

  final = Cache(S=states, n=book.n, info=book.info, lo=book.lo, m=book.m,
                open_sq=jnp.sum(take_slot(states, book.m - 1) ** 2, axis=(-2, -1)),
                total_sq=jnp.sum(jnp.sum(states, axis=2) ** 2, axis=(-2, -1)),
                pos=cache.pos + t)
  record = Decisions(*(_from_chunks(a, t) for a in (layout.boundary, layout.score,
                                                    layout.merge_idx, layout.num_slots)))
  return o, final, record


def _block_v(dv: int) -> int:
  """Value block of the slot pass: 32 columns (more programs, fewer registers), or all of Dv."""
  return 32 if dv > 32 and dv % 32 == 0 else dv

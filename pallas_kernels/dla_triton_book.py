"""DLA's scalar bookkeeping (spec dla.md §4.4, §6) as a Triton-lowered Pallas kernel: scores,
boundaries, capacity merges and the block layout after every token.

Decisions depend on the slot states only through ONE `[Dk, Dv]` reference state X per
(batch, head): the open slot for `score_ref="open"` (after a boundary the open slot is the token
alone, whatever was merged, so X follows a single-state recurrence reset at boundaries) or the
base state `Σ_i S_i` for `"total"` (reset only by segments). So the bookkeeping runs ahead of the
K-slot pass. Grid `(B·H,)`: one program per (batch, head) loops over the N chunks, carrying X in
registers and the slot metadata as `[Kp]` vectors (Kp = K rounded up to a power of two, padding
slots stay zero). Per chunk (c0 its first position):

  1. key responses of X, one matmul `K̃′ X [C, Dv]` (§6.3): for the open score its rowdot with V
     (Mamba-2) or the rows themselves (GDN); for the total score `r = K̃′ X + A_kk V` (§6.4);
  2. a loop over the C tokens on scalars (§6.3 "The scan"): the score I_i from the running open
     block (`rows[i, s]` for s in the open block: A_kk ⊙ V Vᵀ for Mamba-2, A_kk for GDN), the
     boundary `I_i ≥ τ` (or the injected one), the least-dense adjacent merge when the cache is
     full (vector shifts as one-hot selections), and the layout (m_i, lo_i[K]) after token i;
  3. X at the chunk end: `[open block predates c0]·F X + Σ_{s in the open block} K̂[s] v_sᵀ`
     (open) or `[no reset]·F X + K̂ᵀ V` (total), and ‖X‖² (open_sq or total_sq).

The state-free inputs (K̃′, K̂, Kγ, γ_end, the rows, A_kk V) come from the XLA chunk math
(`dla_common`). The kernel has no backward: decisions carry no gradient (its inputs are under
`stop_gradient`).
Work per chunk: two or three `[C, Dk]·[Dk, Dv]` matmuls, plus O(C + Kp²) scalar work per token
(O(C·Dv) for the GDN open score).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dlax_kernels.common import next_power_of_2
from dlax.ops.dla.scores import open_slot_norms, score_from_norms
from dlax_kernels.dla_common import Book, Layout, Options

_SQ = pl.squeezed


class _Static(NamedTuple):
  opts: Options
  gdn: bool
  forced: bool
  resets: bool
  length: int                 # T (tokens at or past T are padding)
  interpret: bool


# --- vector helpers (§4.4), usable inside kernels ----------------------------------------------


def _iota(n: int):
  return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _pick(x, i):
  """`x[i]` of a vector (a masked sum: registers cannot be indexed dynamically)."""
  return jnp.sum(jnp.where(_iota(x.shape[0]) == i, x, jnp.zeros_like(x)), dtype=x.dtype)


def _pick_row(x, i):
  """Row `x[i, :]` of a matrix."""
  return jnp.sum(jnp.where((_iota(x.shape[0]) == i)[:, None], x, 0.0), axis=0)


def _gather(x, src):
  """`out[j] = x[src[j]]`, 0 where src[j] is out of range (a one-hot selection)."""
  hit = _iota(x.shape[0])[:, None] == src[None, :]
  return jnp.sum(jnp.where(hit, x[:, None], jnp.zeros_like(x)[:, None]), axis=0, dtype=x.dtype)


def _merge_index(n, info, capacity: int):
  """`argmin_i (Ī_i + Ī_{i+1}) / (n_i + n_{i+1})` over i < K−1, ties to the oldest pair."""
  slots = _iota(n.shape[0])
  pair_n = (n + _gather(n, slots + 1)).astype(info.dtype)
  pair_info = info + _gather(info, slots + 1)
  ok = (slots < capacity - 1) & (pair_n > 0)
  density = jnp.where(ok, pair_info / jnp.where(ok, pair_n, 1.0), jnp.inf)
  return jnp.min(jnp.where(density == jnp.min(density), slots, n.shape[0]))


def _merge_adjacent(x, merge_idx, capacity: int, combine: bool = True):
  """Merges slots (i, i+1) (sum, or keep x_i) and shifts later slots down; −1: unchanged."""
  slots = _iota(x.shape[0])
  idx = jnp.where((merge_idx >= 0) & (merge_idx < capacity - 1), merge_idx, x.shape[0])
  out = _gather(x, slots + (slots > idx).astype(jnp.int32))
  if combine:
    out = out + jnp.where(slots == idx, _pick(x, idx + 1), jnp.zeros_like(x))
  return out


# --- the kernel --------------------------------------------------------------------------------


def _token_step(st: _Static, r, x, n, c0, i, book: Book):
  """Token i of chunk n (§4.6 on scalars). `x`: per-chunk vectors of the key responses."""
  opts = st.opts
  k = opts.capacity
  scalars = r["scalars"]
  alpha, beta, k_sq, v_sq = (scalars[n, f, i] for f in range(4))
  if st.resets:
    reset = r["resets"][n, i] != 0
    book = jax.tree.map(lambda a: jnp.where(reset, jnp.zeros_like(a), a), book)
  size = r["x0"].shape[0] * r["x0"].shape[1]
  beta = beta if st.gdn else None
  if opts.score_ref == "open":
    open_lo = _pick(book.lo, book.m - 1)
    pre = open_lo < c0
    s = _iota(x["v"].shape[0])
    row = jnp.where((s >= open_lo - c0) & (s < i), r["rows"][n, i, :], 0.0)
    if st.gdn:
      u = jnp.where(pre, _pick_row(x["pre"], i), 0.0) + jnp.sum(row[:, None] * x["v"], axis=0)
      u_sq, u_dot_v = jnp.sum(u * u), jnp.sum(u * r["v"][n, i, :])
    else:
      u_sq, u_dot_v = None, jnp.where(pre, _pick(x["pre"], i), 0.0) + jnp.sum(row)
    r_sq, r_dot_c, c_sq = open_slot_norms(book.open_sq, u_sq, u_dot_v, k_sq, v_sq, alpha, beta)
    new_sq = r_sq + 2.0 * r_dot_c + c_sq
    score = score_from_norms(new_sq, r_sq, r_sq + r_dot_c, size=size, eps=opts.eps,
                              eps_r=opts.eps_r)
  else:
    beta_ = 1.0 if beta is None else beta
    r_dot_e, e_sq = _pick(x["r_dot_e"], i), _pick(x["e_sq"], i)
    prev_sq = book.total_sq
    new_sq = alpha * alpha * prev_sq + 2.0 * alpha * beta_ * r_dot_e + beta_ * beta_ * k_sq * e_sq
    score = score_from_norms(new_sq, prev_sq, alpha * prev_sq + beta_ * r_dot_e, size=size,
                              eps=opts.eps, eps_r=opts.eps_r)
  score = jnp.where(book.m == 0, jnp.asarray(opts.tau, score.dtype), score)

  if st.forced:
    boundary, merge_idx = r["forced"][n, 0, i] != 0, r["forced"][n, 1, i]
  else:
    boundary, merge_idx = score >= opts.tau, _merge_index(book.n, book.info, k)
  boundary = boundary | (book.m == 0)                                    # legalise (§5.4)
  merge_idx = jnp.where(boundary & (book.m == k), jnp.clip(merge_idx, 0, k - 2), -1)

  m = book.m - (merge_idx >= 0).astype(jnp.int32)
  slot = jnp.where(boundary, m, m - 1)
  hit = _iota(book.lo.shape[0]) == slot
  pos = c0 + i
  new = Book(
      m=m + boundary.astype(jnp.int32),
      n=_merge_adjacent(book.n, merge_idx, k) + hit.astype(jnp.int32),
      info=_merge_adjacent(book.info, merge_idx, k) + jnp.where(hit, score, 0.0),
      lo=jnp.where(hit & boundary, pos, _merge_adjacent(book.lo, merge_idx, k, combine=False)),
      open_sq=(jnp.where(boundary, c_sq, new_sq) if opts.score_ref == "open" else book.open_sq),
      total_sq=new_sq if opts.score_ref == "total" else book.total_sq)
  valid = n * x["v"].shape[0] + i < st.length
  new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, book)
  r["boundary"][n, i] = (boundary & valid).astype(jnp.int32)
  r["score"][n, i] = score
  r["merge_idx"][n, i] = jnp.where(valid, merge_idx, -1)
  r["num_slots"][n, i] = new.m
  r["lo_hist"][n, i, :] = new.lo
  return new


def _dot(a, b, contract=(1, 0)):
  acc = jnp.promote_types(jnp.float32, a.dtype)
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def _chunk_step(st: _Static, r, n, carry):
  """Chunk n: key responses, the token loop, X at the chunk end."""
  state, book = carry
  opts = st.opts
  v = r["v"][n]
  c = v.shape[0]
  c0 = r["pos0"][0] + n * c
  r["lo_start"][n, :] = book.lo
  r["m_start"][n] = book.m
  response = _dot(r["k_tilde"][n], state)                               # (K̃′ X)_i
  x = {"v": v}
  if opts.score_ref == "open":
    x["pre"] = response if st.gdn else jnp.sum(response * v, axis=1)
  else:
    resp = response + r["r_in"][n]                                       # S_{i−1}ᵀ k_i
    e = v - r["scalars"][n, 0, :][:, None] * resp if st.gdn else v
    x["r_dot_e"], x["e_sq"] = jnp.sum(resp * e, axis=1), jnp.sum(e * e, axis=1)
  book = lax.fori_loop(jnp.int32(0), jnp.int32(c), functools.partial(_token_step, st, r, x, n, c0),
                       book)

  s_abs = c0 + _iota(c)
  kh = r["k_hat"][n]
  if opts.score_ref == "open":
    open_lo = _pick(book.lo, book.m - 1)
    keep = open_lo < c0                                                  # block predates c0
    kh = jnp.where(((s_abs >= open_lo) & (n * c + _iota(c) < st.length))[:, None], kh, 0.0)
  else:
    keep = (jnp.max(r["resets"][n, :]) == 0) if st.resets else True
  carried = r["end_decay"][n] * state
  if st.gdn:
    carried = carried - _dot(r["k_hat"][n], _dot(r["k_gamma"][n], state), (0, 0))
  state = jnp.where(keep, carried, 0.0) + _dot(kh, v, (0, 0))
  sq = jnp.sum(state * state)
  book = book._replace(**{"open_sq" if opts.score_ref == "open" else "total_sq": sq})
  if not st.interpret:
    plt.debug_barrier()
  return state, book


def _kernel(names, st: _Static, *refs):
  r = dict(zip(names, refs))
  book = Book(m=r["m0"][0], n=r["n0"][...], info=r["info0"][...], lo=r["lo0"][...],
              open_sq=r["sq0"][0], total_sq=r["sq0"][1])
  num_chunks = r["v"].shape[0]
  state, book = lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks),
                              functools.partial(_chunk_step, st, r),
                              (r["x0"][...], book))
  r["m"][0] = book.m
  r["n"][...] = book.n
  r["info"][...] = book.info
  r["lo"][...] = book.lo
  r["sq"][0] = book.open_sq
  r["sq"][1] = book.total_sq


def _spec(shape, heads: int | None = None):
  """Whole trailing block of a `[BH, ...]` array (or of a per-batch `[B, ...]` one, `heads`)."""
  rest = tuple(shape[1:])
  lead = (lambda bh: bh) if heads is None else (lambda bh: bh // heads)
  return pl.BlockSpec((_SQ, *rest), lambda bh: (lead(bh), *(0,) * len(rest)))


def bookkeeping(opts: Options, inputs: dict, book: Book, ref_state, pos0, *, heads: int,
                length: int, interpret: bool):
  """Runs the bookkeeping kernel.

  Args:
    inputs: per head `[BH, N, ...]`: k_tilde, k_hat `[.., C, Dk]`, k_gamma (GDN), end_decay
      `[BH, N]`, v `[.., C, Dv]`, scalars `[.., 4, C]` (α, β, ‖k‖², ‖v‖²), rows `[.., C, C]`
      (open) or r_in `[.., C, Dv]` (total), forced `[.., 2, C]` int (injected boundary,
      merge index) or absent; per batch: resets `[B, N, C]` int or absent.
    book: initial scalars `[BH, (K)]`; ref_state: X `[BH, Dk, Dv]`; pos0: `[B]` start position.
    heads: H. length: T.

  Returns:
    (final `Book` `[BH, (K)]`, `Layout` `[BH, N, ...]`).
  """
  k = opts.capacity
  kp = next_power_of_2(k)
  acc = ref_state.dtype
  bh, num_chunks, c = inputs["v"].shape[:3]
  pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, kp - k)])
  ins = {name: a for name, a in inputs.items() if a is not None}
  ins.update(x0=ref_state, m0=book.m[:, None].astype(jnp.int32), n0=pad(book.n),
             info0=pad(book.info), lo0=pad(book.lo),
             sq0=jnp.stack([book.open_sq, book.total_sq], axis=-1), pos0=pos0[:, None])
  ins = jax.lax.stop_gradient(ins)
  per_batch = ("resets", "pos0")
  sds = jax.ShapeDtypeStruct
  outs = dict(boundary=sds((bh, num_chunks, c), jnp.int32), score=sds((bh, num_chunks, c), acc),
              merge_idx=sds((bh, num_chunks, c), jnp.int32),
              num_slots=sds((bh, num_chunks, c), jnp.int32),
              lo_hist=sds((bh, num_chunks, c, kp), jnp.int32),
              lo_start=sds((bh, num_chunks, kp), jnp.int32),
              m_start=sds((bh, num_chunks), jnp.int32), m=sds((bh, 1), jnp.int32),
              n=sds((bh, kp), jnp.int32), info=sds((bh, kp), acc), lo=sds((bh, kp), jnp.int32),
              sq=sds((bh, 2), acc))
  st = _Static(opts=opts, gdn="k_gamma" in ins, forced="forced" in ins, resets="resets" in ins,
               length=length, interpret=interpret)
  dk = ref_state.shape[1]
  results = pl.pallas_call(
      functools.partial(_kernel, (*ins, *outs), st),
      grid=(bh,),
      in_specs=[_spec(a.shape, heads if name in per_batch else None) for name, a in ins.items()],
      out_specs=[_spec(s.shape) for s in outs.values()],
      out_shape=list(outs.values()),
      compiler_params=None if interpret else plt.CompilerParams(
          num_warps=4 if dk <= 64 else 8, num_stages=1),
      interpret=interpret,
  )(*ins.values())
  out = dict(zip(outs, results))
  final = Book(m=out["m"][:, 0], n=out["n"][:, :k], info=out["info"][:, :k], lo=out["lo"][:, :k],
               open_sq=out["sq"][:, 0], total_sq=out["sq"][:, 1])
  layout = Layout(boundary=out["boundary"] != 0, score=out["score"], merge_idx=out["merge_idx"],
                  num_slots=out["num_slots"], lo_hist=out["lo_hist"][..., :k],
                  lo_start=out["lo_start"][..., :k], m_start=out["m_start"])
  return final, layout

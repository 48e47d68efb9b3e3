"""DLA's scalar bookkeeping (spec dla.md §4.4, §6) as a Mosaic TPU kernel: scores, boundaries,
capacity merges and the block layout after every token; plus the setup and vector helpers of
the DLA TPU kernels.

As in `dla_triton_book`, decisions depend on the slot states only through ONE `[Dk, Dv]`
reference state X per (batch, head): the open slot (`score_ref="open"`) or the base state
`Σ_i S_i` (`"total"`). Grid `(B·H, N)`: batch·head "parallel", chunks "arbitrary"; X `[Dk, Dv]`
and the slot metadata live in VMEM scratch across the chunks (metadata as lane vectors
`[1, Kp]`, Kp = K rounded up to the 128 lanes: m broadcast, n, lo as int32 rows, Ī, open_sq,
total_sq as float rows), the sequence start `pos0 [B]` is scalar-prefetched into SMEM. Per chunk
(c0 its first position), with the chunk's blocks in VMEM:

  1. key responses of X, one matmul `K̃′ X [C, Dv]` (§6.3): for the open score its rowdot with V
     (Mamba-2) or the rows themselves (GDN, kept in a `[C, Dv]` scratch); for the total score
     `r = K̃′ X + A_kk V`, `r·e` and `‖e‖²` (§6.4);
  2. `fori_loop` over the C tokens, all in vector registers: the token's scalars are picked from
     `[4, C]` lane rows by masked lane sums (a `[R, 1]` result), its `rows[i, :]` (open block
     sum: A_kk ⊙ V Vᵀ for Mamba-2, A_kk for GDN) by a dynamic sublane load; the score, the
     boundary `I ≥ τ` (or the injected one), the least-dense adjacent merge when the cache is full
     (`x[j+1]` by a lane rotation `pltpu.roll`), and the layout after the token. Per-token records
     are carried as `[1, C]` rows (lane i updated by a select) and stored once per chunk; the
     block starts lo_i `[1, Kp]` go to row i of the `[C, Kp]` output block.
  3. X at the chunk end: `[open block predates c0]·F X + Σ_{s in the open block} K̂[s] v_sᵀ`
     (open) or `[no reset]·F X + K̂ᵀ V` (total); ‖X‖² into open_sq or total_sq.

The slot layout at each chunk start (lo, m) is the layout after the previous chunk's last token,
so XLA reads it off the records. No backward: decisions carry no gradient (inputs under
`stop_gradient`). Work per chunk: two or three `[C, Dk]·[Dk, Dv]` matmuls, plus O(C + Kp) vector
work per token (a `[1, C]·[C, Dv]` product for the GDN open score).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dlax_kernels import _tpu_chunks as chunks
from dlax_kernels.common import tpu_interpret
from dlax.ops.dla.scores import open_slot_norms, score_from_norms
from dlax_kernels.dla_common import Book, Layout, Options

NN = chunks._NN                             # A B
NT = chunks._NT                             # A Bᵀ
TN = chunks._TN                             # Aᵀ B


@dataclasses.dataclass(frozen=True)
class Setup:
  """Static configuration of the DLA TPU kernels (hashable: a `custom_vjp` static argument).

  gdn: delta rule (δ = 1) or Mamba-2. block_v: value columns per slot-pass program. group:
  chunks per checkpoint group of the slot states (R). head_multiple: head dims are zero-padded to
  a multiple of it (128 lanes compiled, 1 interpreted)."""
  gdn: bool
  block_v: int
  group: int
  interpret: bool
  head_multiple: int
  vmem_limit_bytes: int | None = None

  def compiler_params(self, parallel: int):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * parallel + ("arbitrary",),
                                vmem_limit_bytes=self.vmem_limit_bytes)

  def interpret_params(self):
    return tpu_interpret(self.interpret)


# --- vector helpers, used inside kernels ---------------------------------------------------------


def dot(a, b, dims=NN):
  """MXU product at full precision, accumulated in fp32 (fp64 for fp64 operands, interpreted)."""
  acc = jnp.promote_types(jnp.float32, jnp.promote_types(a.dtype, b.dtype))
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def lanes(n: int):
  """Lane index `[1, n]`."""
  return lax.broadcasted_iota(jnp.int32, (1, n), 1)


def pick_lane(x, i):
  """Column i of `x [R, L]` as `[R, 1]`, i dynamic (a masked lane sum)."""
  return jnp.sum(jnp.where(lanes(x.shape[1]) == i, x, jnp.zeros_like(x)), axis=1, keepdims=True,
                 dtype=x.dtype)


def pad_last(x, multiple: int, axis: int = -1):
  """Zero-pads `axis` to a multiple of `multiple` (padded head dims are inert)."""
  if x is None or x.shape[axis] % multiple == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, -x.shape[axis] % multiple)
  return jnp.pad(x, widths)


def _next_slot(x):
  """`x[j + 1]` at lane j (0 at the last lane): a lane rotation."""
  kp = x.shape[1]
  return jnp.where(lanes(kp) == kp - 1, jnp.zeros_like(x), pltpu.roll(x, jnp.int32(kp - 1), 1))


def _merge_index(n, info, capacity: int):
  """`argmin_i (Ī_i + Ī_{i+1}) / (n_i + n_{i+1})` over i < K−1, ties to the oldest pair
  (`[1, 1]`)."""
  slots = lanes(n.shape[1])
  pair_n = (n + _next_slot(n)).astype(info.dtype)
  pair_info = info + _next_slot(info)
  ok = (slots < capacity - 1) & (pair_n > 0)
  density = jnp.where(ok, pair_info / jnp.where(ok, pair_n, 1.0), jnp.inf)
  best = jnp.min(density, axis=1, keepdims=True)
  return jnp.min(jnp.where(density == best, slots, n.shape[1]), axis=1, keepdims=True)


def _merge_adjacent(x, merge_idx, capacity: int, combine: bool = True):
  """Merges slots (i, i+1) (sum, or keep x_i) and shifts later slots down; −1: unchanged."""
  slots = lanes(x.shape[1])
  idx = jnp.where((merge_idx >= 0) & (merge_idx < capacity - 1), merge_idx, x.shape[1])
  nxt = _next_slot(x)
  at_idx = x + nxt if combine else x
  return jnp.where(slots < idx, x, jnp.where(slots == idx, at_idx, nxt))


# --- the kernel ----------------------------------------------------------------------------------


class _Static(NamedTuple):
  opts: Options
  gdn: bool
  forced: bool
  resets: bool
  heads: int                  # H (pos0 and resets are per batch)
  length: int                 # T (tokens at or past T are padding)
  size: int                   # Dk·Dv of the unpadded state (score normalisation)


class _Record(NamedTuple):
  """Per-token results of one chunk as `[1, C]` rows."""
  boundary: jax.Array
  merge_idx: jax.Array
  num_slots: jax.Array
  score: jax.Array


def _load_book(ints, floats) -> Book:
  """Book from the `[3, Kp]` scratch rows (ints: m, n, lo; floats: Ī, open_sq, total_sq)."""
  i, f = ints[...], floats[...]
  return Book(m=i[0:1, 0:1], n=i[1:2, :], info=f[0:1, :], lo=i[2:3, :], open_sq=f[1:2, 0:1],
              total_sq=f[2:3, 0:1])


def _store_book(ints, floats, book: Book) -> None:
  kp = ints.shape[1]
  wide = lambda x: jnp.broadcast_to(x, (1, kp))
  ints[0:1, :] = wide(book.m)
  ints[1:2, :] = book.n
  ints[2:3, :] = book.lo
  floats[0:1, :] = book.info
  floats[1:2, :] = wide(book.open_sq)
  floats[2:3, :] = wide(book.total_sq)


def _score(st: _Static, r, x, i, c0, book: Book, scalars):
  """(I, ‖X_new‖²-candidate, ‖c‖²) of token i (§6.1–6.4), all `[1, 1]`."""
  opts = st.opts
  alpha, beta, k_sq, v_sq = (scalars[f:f + 1] for f in range(4))
  if opts.score_ref == "total":
    beta = 1.0 if not st.gdn else beta
    r_dot_e, e_sq = pick_lane(x["r_dot_e"], i), pick_lane(x["e_sq"], i)
    prev_sq = book.total_sq
    new_sq = alpha * alpha * prev_sq + 2.0 * alpha * beta * r_dot_e + beta * beta * k_sq * e_sq
    score = score_from_norms(new_sq, prev_sq, alpha * prev_sq + beta * r_dot_e, size=st.size,
                             eps=opts.eps, eps_r=opts.eps_r)
    return score, new_sq, None
  open_lo = pick_lane(book.lo, book.m - 1)
  pre = open_lo < c0
  s = lanes(x["v"].shape[0])
  row = jnp.where((s >= open_lo - c0) & (s < i), r["rows"][pl.ds(i, 1), :], 0.0)
  if st.gdn:
    u = jnp.where(pre, r["response"][pl.ds(i, 1), :], 0.0) + dot(row, x["v"])
    u_sq = jnp.sum(u * u, axis=1, keepdims=True)
    u_dot_v = jnp.sum(u * r["v"][pl.ds(i, 1), :], axis=1, keepdims=True)
  else:
    u_sq = None
    u_dot_v = jnp.where(pre, pick_lane(x["pre"], i), 0.0) + jnp.sum(row, axis=1, keepdims=True)
  r_sq, r_dot_c, c_sq = open_slot_norms(book.open_sq, u_sq, u_dot_v, k_sq, v_sq, alpha,
                                        beta if st.gdn else None)
  new_sq = r_sq + 2.0 * r_dot_c + c_sq
  score = score_from_norms(new_sq, r_sq, r_sq + r_dot_c, size=st.size, eps=opts.eps,
                           eps_r=opts.eps_r)
  return score, new_sq, c_sq


def _token_step(st: _Static, r, x, n, c0, i, carry):
  """Token i of chunk n (§4.6 on the slot metadata)."""
  book, rec = carry
  opts = st.opts
  k = opts.capacity
  c = x["v"].shape[0]
  if st.resets:
    reset = pick_lane(x["resets"], i) != 0
    book = jax.tree.map(lambda a: jnp.where(reset, jnp.zeros_like(a), a), book)
  score, new_sq, c_sq = _score(st, r, x, i, c0, book, pick_lane(x["scalars"], i))
  score = jnp.where(book.m == 0, jnp.asarray(opts.tau, score.dtype), score)

  if st.forced:
    forced = pick_lane(x["forced"], i)
    boundary, merge_idx = forced[0:1] != 0, forced[1:2]
  else:
    boundary, merge_idx = score >= opts.tau, _merge_index(book.n, book.info, k)
  boundary = boundary | (book.m == 0)                                    # legalise (§5.4)
  merge_idx = jnp.where(boundary & (book.m == k), jnp.clip(merge_idx, 0, k - 2), -1)

  m = book.m - (merge_idx >= 0).astype(jnp.int32)
  hit = lanes(book.lo.shape[1]) == jnp.where(boundary, m, m - 1)
  position = jnp.full((1, 1), c0 + i, jnp.int32)
  new = Book(
      m=m + boundary.astype(jnp.int32),
      n=_merge_adjacent(book.n, merge_idx, k) + hit.astype(jnp.int32),
      info=_merge_adjacent(book.info, merge_idx, k) + jnp.where(hit, score, 0.0),
      lo=jnp.where(hit & boundary, position,
                   _merge_adjacent(book.lo, merge_idx, k, combine=False)),
      open_sq=(jnp.where(boundary, c_sq, new_sq) if opts.score_ref == "open" else book.open_sq),
      total_sq=new_sq if opts.score_ref == "total" else book.total_sq)
  valid = jnp.full((1, 1), n * c + i, jnp.int32) < st.length
  new = jax.tree.map(lambda a, b: jnp.where(valid, a, b), new, book)
  r["lo_hist"][pl.ds(i, 1), :] = new.lo
  at_i = lanes(c) == i
  rec = _Record(boundary=jnp.where(at_i, (boundary & valid).astype(jnp.int32), rec.boundary),
                merge_idx=jnp.where(at_i, jnp.where(valid, merge_idx, -1), rec.merge_idx),
                num_slots=jnp.where(at_i, new.m, rec.num_slots),
                score=jnp.where(at_i, score, rec.score))
  return new, rec


def _key_responses(st: _Static, r, state, v):
  """Per-chunk vectors of the token loop (step 1 of the module docstring)."""
  response = dot(r["k_tilde"][...], state)                               # (K̃′ X)_i  [C, Dv]
  x = {"v": v, "scalars": r["scalars"][...]}
  for name in ("forced", "resets"):
    if name in r:
      x[name] = r[name][...]
  if st.opts.score_ref == "open":
    if st.gdn:
      r["response"][...] = response
    else:
      x["pre"] = chunks._col_to_row(jnp.sum(response * v, axis=1, keepdims=True))
  else:
    response = response + r["r_in"][...]                                 # S_{i−1}ᵀ k_i
    alpha = chunks._row_to_col(x["scalars"][0:1, :])
    e = v - alpha * response if st.gdn else v
    x["r_dot_e"] = chunks._col_to_row(jnp.sum(response * e, axis=1, keepdims=True))
    x["e_sq"] = chunks._col_to_row(jnp.sum(e * e, axis=1, keepdims=True))
  return x


def _advance_reference(st: _Static, r, state, book: Book, n, c0):
  """X at the chunk end (step 3)."""
  c = r["v"].shape[0]
  kh = r["k_hat"][...]
  if st.opts.score_ref == "open":
    open_lo = pick_lane(book.lo, book.m - 1)
    keep = open_lo < c0                                                  # block predates c0
    token = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    in_block = (c0 + token >= open_lo) & (n * c + token < st.length)
    written = jnp.where(in_block, kh, 0.0)
  else:
    keep = (jnp.max(r["resets"][...], axis=1, keepdims=True) == 0) if st.resets else True
    written = kh
  carried = pick_lane(r["end_decay"][...], n) * state
  if st.gdn:
    carried = carried - dot(kh, dot(r["k_gamma"][...], state), TN)
  return jnp.where(keep, carried, 0.0) + dot(written, r["v"][...], TN)


def _kernel(pos_ref, *refs, names, st: _Static):
  r = dict(zip(names, refs))
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _():
    r["state"][...] = r["x0"][...]
    r["ints"][...] = r["ints0"][...]
    r["floats"][...] = r["floats0"][...]

  c = r["v"].shape[0]
  c0 = pos_ref[lax.div(pl.program_id(0), jnp.int32(st.heads))] + n * c
  state = r["state"][...]
  v = r["v"][...]
  x = _key_responses(st, r, state, v)
  zeros = jnp.zeros((1, c), jnp.int32)
  record = _Record(zeros, zeros, zeros, jnp.zeros((1, c), state.dtype))
  book, record = lax.fori_loop(jnp.int32(0), jnp.int32(c),
                               functools.partial(_token_step, st, r, x, n, c0),
                               (_load_book(r["ints"], r["floats"]), record))
  for row, value in enumerate(record[:3]):
    r["record"][row:row + 1, :] = value
  r["score"][...] = record.score

  state = _advance_reference(st, r, state, book, n, c0)
  sq = jnp.sum(state * state, axis=(0, 1), keepdims=True)
  book = book._replace(**{"open_sq" if st.opts.score_ref == "open" else "total_sq": sq})
  r["state"][...] = state
  _store_book(r["ints"], r["floats"], book)

  @pl.when(n == pl.num_programs(1) - 1)
  def _():
    r["ints_out"][...] = r["ints"][...]
    r["floats_out"][...] = r["floats"][...]


def bookkeeping(opts: Options, inputs: dict, book: Book, ref_state, pos0, *, heads: int,
                length: int, setup: Setup):
  """Runs the bookkeeping kernel (the `Kernels.bookkeeping` of `dla_common`).

  Args:
    inputs: per head `[BH, N, ...]` (`dla_common.book_inputs`), per batch resets `[B, N, C]`
      int or absent.
    book: initial scalars `[BH, (K)]`; ref_state: X `[BH, Dk, Dv]`; pos0: `[B]` start position.
    heads: H. length: T.

  Returns:
    (final `Book` `[BH, (K)]`, `Layout` `[BH, N, ...]`).
  """
  k = opts.capacity
  kp = -k % chunks.LANES + k
  acc = ref_state.dtype
  bh, num_chunks, c = inputs["v"].shape[:3]
  dk, dv = ref_state.shape[1:]
  hm = setup.head_multiple
  ins = {name: a for name, a in inputs.items() if a is not None}
  for name in ("k_tilde", "k_hat", "k_gamma", "v", "r_in"):
    if name in ins:
      ins[name] = pad_last(ins[name], hm)
  ins["end_decay"] = ins["end_decay"][:, None, :]                         # [BH, 1, N]
  if "resets" in ins:
    ins["resets"] = ins["resets"][:, :, None, :]                          # [B, N, 1, C]
  wide = lambda x: jnp.broadcast_to(x[:, None], (bh, kp))
  pad = lambda a: jnp.pad(a, [(0, 0), (0, kp - k)])
  ins["x0"] = pad_last(pad_last(ref_state, hm, -2), hm)
  ins["ints0"] = jnp.stack([wide(book.m), pad(book.n), pad(book.lo)], axis=1).astype(jnp.int32)
  ins["floats0"] = jnp.stack([pad(book.info), wide(book.open_sq), wide(book.total_sq)], axis=1)
  ins = jax.lax.stop_gradient(ins)

  chunk = lambda a: pl.BlockSpec((None, None, *a.shape[2:]), lambda i, n, p: (i, n, 0, 0))
  whole = lambda a: pl.BlockSpec((None, *a.shape[1:]), lambda i, n, p: (i, 0, 0))
  in_specs = {name: chunk(a) for name, a in ins.items()}
  in_specs.update({name: whole(ins[name]) for name in ("end_decay", "x0", "ints0", "floats0")})
  if "resets" in ins:
    in_specs["resets"] = pl.BlockSpec((None, None, 1, c),
                                      lambda i, n, p: (lax.div(i, jnp.int32(heads)), n, 0, 0))
  sds = jax.ShapeDtypeStruct
  outs = dict(record=sds((bh, num_chunks, 3, c), jnp.int32),
              score=sds((bh, num_chunks, 1, c), acc),
              lo_hist=sds((bh, num_chunks, c, kp), jnp.int32),
              ints_out=sds((bh, 3, kp), jnp.int32), floats_out=sds((bh, 3, kp), acc))
  out_specs = [chunk(s) if len(s.shape) == 4 else whole(s) for s in outs.values()]
  x0 = ins["x0"]
  scratch = dict(state=pltpu.VMEM(x0.shape[1:], acc), ints=pltpu.VMEM((3, kp), jnp.int32),
                 floats=pltpu.VMEM((3, kp), acc))
  gdn = "k_gamma" in ins
  if gdn and opts.score_ref == "open":
    scratch["response"] = pltpu.VMEM((c, x0.shape[-1]), acc)
  st = _Static(opts=opts, gdn=gdn, forced="forced" in ins, resets="resets" in ins, heads=heads,
               length=length, size=dk * dv)
  results = pl.pallas_call(
      functools.partial(_kernel, names=(*ins, *outs, *scratch), st=st),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(bh, num_chunks), in_specs=list(in_specs.values()),
          out_specs=out_specs, scratch_shapes=list(scratch.values())),
      out_shape=list(outs.values()),
      compiler_params=setup.compiler_params(1),
      interpret=setup.interpret_params(),
      name="dla_bookkeeping",
  )(pos0.astype(jnp.int32), *ins.values())
  out = dict(zip(outs, results))
  ints, floats = out["ints_out"], out["floats_out"]
  final = Book(m=ints[:, 0, 0], n=ints[:, 1, :k], info=floats[:, 0, :k], lo=ints[:, 2, :k],
               open_sq=floats[:, 1, 0], total_sq=floats[:, 2, 0])
  lo_hist = out["lo_hist"][..., :k]
  num_slots = out["record"][:, :, 2]
  lo_start = jnp.concatenate([book.lo[:, None].astype(jnp.int32), lo_hist[:, :-1, -1]], axis=1)
  m_start = jnp.concatenate([book.m[:, None].astype(jnp.int32), num_slots[:, :-1, -1]], axis=1)
  layout = Layout(boundary=out["record"][:, :, 0] != 0, score=out["score"][:, :, 0],
                  merge_idx=out["record"][:, :, 1], num_slots=num_slots, lo_hist=lo_hist,
                  lo_start=lo_start, m_start=m_start)
  return final, layout

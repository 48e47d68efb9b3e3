"""DLA's multi-state readout and slot-state pass (spec dla.md §7.2 steps 3–4, §7.3) as Mosaic TPU
kernels, forward and backward, under a `custom_vjp`.

Per chunk n (quantities from `dla_common`): Q̃, K̂, Kγ = diag(γ)K `[C, Dk]`, γ_end, the λ-weighted
intra-chunk weights `W = Λ_in ⊙ A_in [C, C]`, the pre-chunk λ weights `Λ_pre [C, K]` (zero for
dead slots), the chunk-end block of every token `blk [C]` (−1: padding) and, as scalars in SMEM,
`m_pre`, `m_end` and `first [K+1]` (pre-chunk slots `first[b] ≤ j < first[b+1]` merge into
chunk-end block b; slots from `first[m_end]` to `m_pre` were dropped by a segment reset):

  forward   o = W V + Σ_{j<m_pre} Λ_pre[:, j] ⊙ (Q̃ S_j)
            S'_b = F(Σ_{j→b} S_j) + (1[blk = b] ⊙ K̂)ᵀ V,   F P = γ_end P − δ K̂ᵀ (Kγ P)
  backward  chunks in reverse, with the slot cotangents D_b of the chunk end:
            dV = Wᵀ dO + Σ_b 1[blk = b] ⊙ (K̂ D_b),  dW = tril(dO Vᵀ)
            dK̂ = Σ_b 1[blk = b] ⊙ (V D_bᵀ) − δ (Kγ P_b) D_bᵀ,  dKγ = −δ (K̂ D_b) P_bᵀ
            dγ_end = Σ_b ⟨D_b, P_b⟩,  dΛ_pre[:, j] = rowdot(dO, Q̃ S_j),
            dQ̃ = Σ_j (Λ_pre[:, j] ⊙ dO) S_jᵀ
            D_j (chunk start) = γ_end D_b − δ Kγᵀ (K̂ D_b) + Q̃ᵀ (Λ_pre[:, j] ⊙ dO)   for j → b
  (P_b = Σ_{j→b} S_j; a merge copies the cotangent to both children, an append starts a fresh
  one, a dropped slot gets the readout term only.)

Forward: grid (B·H, Dv/bv, N), chunks "arbitrary". The K slot states `[K, Dk, bv]` of one
(batch·head, value block) live in one VMEM scratch and are updated IN PLACE: blocks b in
increasing order read slots `first[b]..first[b+1]−1` (all ≥ b, since merges only move slots
down) before writing slot b; a dropped slot's readout runs before any write. The initial states
come in and the final ones go out by DMA (HBM refs, `memory_space=ANY`), and so do the
checkpoints: the states entering every R-th chunk (R = `Setup.group`) go to `[⌈N/R⌉, K, Dk, bv]`
in HBM, the backward's residual.

Backward: grid (B·H, Dv/bv, G·(2R−1)) for G = ⌈N/R⌉ checkpoint groups, last group first. Within
a group, steps p < R−1 recompute the states entering chunks gR+1 .. into a VMEM scratch
`[R, K, Dk, bv]` (the forward without readout; step 0 first loads the checkpoint by DMA), then
steps p ≥ R−1 run chunks gR+R−1 .. gR in reverse. The index maps encode this schedule; inputs
used only by the reverse steps (Q̃, W, Λ_pre, dO) and the gradient outputs point at the group's
first reverse chunk during the recompute steps, so they are fetched once and each output block is
visited in one run of steps. The slot cotangents `[K, Dk, bv]` live in VMEM and are updated in
place with blocks in DECREASING order (block b reads D_b, then writes D_j for its slots j ≥ b,
whose own D_j were read earlier); dropped slots go last. Cotangents contracted over Dv (dQ̃, dK̂,
dKγ, dW, dΛ_pre, dγ_end) are written per value block and summed in XLA; dγ_end accumulates in a
`[1, N]` row resident across the chunk axis. Steps past the last chunk (a partial last group)
do nothing.

VMEM per program: forward one slot stack (K·Dk·bv·4 B: 1.9 MiB at K = 30, Dk = bv = 128, fp32)
plus double-buffered chunk blocks; backward R + 1 stacks (`dla_tpu` caps R to the generation's
VMEM budget).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dlax_kernels import _tpu_chunks as chunks
from dlax_kernels.dla_common import SlotInputs, SlotLayout
from dlax_kernels.dla_tpu_book import NT, TN, Setup, dot, lanes, pad_last, pick_lane


class _Inputs(NamedTuple):
  """Differentiable inputs in kernel layout (head dims padded; k_gamma None for Mamba-2)."""
  q_tilde: jax.Array      # [BH, N, C, Dk]
  k_hat: jax.Array        # [BH, N, C, Dk]
  k_gamma: jax.Array | None
  end_decay: jax.Array    # [BH, 1, N]
  w: jax.Array            # [BH, N, C, C]
  v: jax.Array            # [BH, N, C, Dv]
  lam_pre: jax.Array      # [BH, N, C, K]
  s0: jax.Array           # [BH, NV, K, Dk, bv]


class _Layout(NamedTuple):
  """Block layout (int32, no gradient)."""
  scalars: jax.Array      # [BH, N, 1, K+3]: m_pre, m_end, first[0..K]  (SMEM)
  blk: jax.Array          # [BH, N, 1, C]


class _Chunk(NamedTuple):
  """One chunk's blocks, loaded in the kernel."""
  kh: jax.Array           # [C, Dk]
  kg: jax.Array | None
  gend: jax.Array         # [1, 1]
  v: jax.Array            # [C, bv]
  members: jax.Array      # [C, 1] chunk-end block of each token (float)
  scalars: object         # SMEM ref [1, K+3]

  def m_pre(self):
    return self.scalars[0, 0]

  def m_end(self):
    return self.scalars[0, 1]

  def first(self, b):
    return self.scalars[0, 2 + b]


def _load_chunk(r, n) -> _Chunk:
  kg = r["k_gamma"][...] if "k_gamma" in r else None
  members = chunks._row_to_col(r["blk"][...].astype(jnp.float32))
  return _Chunk(r["k_hat"][...], kg, pick_lane(r["end_decay"][...], n), r["v"][...], members,
                r["scalars"])


def _loop(lower, upper, body, init):
  return lax.fori_loop(jnp.asarray(lower, jnp.int32), jnp.asarray(upper, jnp.int32), body, init)


def _transport(x: _Chunk, total):
  """F P = γ_end P − δ K̂ᵀ (Kγ P) for a `[Dk, bv]` block."""
  out = x.gend * total
  return out if x.kg is None else out - dot(x.kh, dot(x.kg, total), TN)


def _store_to(ref, *lead):
  """`(b, value) -> ref[*lead, b] = value`: stores one slot `[Dk, bv]` of a slot stack."""

  def store(b, value):
    ref[(*lead, b)] = value.astype(ref.dtype)

  return store


def _clear_dead(stack, live):
  """Zeroes the slots `live..K−1` of a stack (dead slots are zero, and get no gradient)."""

  def clear(j, _):
    stack[j] = jnp.zeros(stack.shape[1:], stack.dtype)

  _loop(live, stack.shape[0], clear, None)


def _copy(src, dst, sem):
  copy = pltpu.make_async_copy(src, dst, sem)
  copy.start()
  copy.wait()


def _advance(x: _Chunk, load, store, readout=None):
  """The slot states at the chunk end (`store(b, S'_b)` from `load(j)` = S_j at its start) and,
  with `readout = (Q̃, Λ_pre, o)`, the output o `[C, bv]`; in place when load and store share a
  stack (module docstring)."""
  if readout is None:
    read, o = (lambda j, o: (o, load(j))), jnp.zeros((), x.v.dtype)
  else:
    q_tilde, lam, o = readout

    def read(j, o):
      s = load(j)
      return o + pick_lane(lam, j) * dot(q_tilde, s), s

    o = _loop(x.first(x.m_end()), x.m_pre(), lambda j, o: read(j, o)[0], o)   # dropped slots
  zero = jnp.zeros((x.kh.shape[1], x.v.shape[1]), x.v.dtype)

  def block(b, o):
    def absorb(j, carry):
      o, s = read(j, carry[0])
      return o, carry[1] + s

    o, total = _loop(x.first(b), x.first(b + 1), absorb, (o, zero))
    written = jnp.where(x.members == b, x.kh, 0.0)
    store(b, _transport(x, total) + dot(written, x.v, TN))
    return o

  return _loop(0, x.m_end(), block, o)


def _forward_kernel(*refs, names, group: int):
  """Chunk n: o, the in-place slot update; checkpoints, initial and final states by DMA."""
  r = dict(zip(names, refs))
  bh, vb, n = (pl.program_id(i) for i in range(3))
  slots, sem = r["slots"], r["sem"]

  @pl.when(n == 0)
  def _():
    _copy(r["s0"].at[bh, vb], slots, sem)

  @pl.when(lax.rem(n, jnp.int32(group)) == 0)
  def _():
    _copy(slots, r["ckpt"].at[bh, vb, lax.div(n, jnp.int32(group))], sem)

  x = _load_chunk(r, n)
  o = dot(r["w"][...], x.v)
  o = _advance(x, lambda j: slots[j], _store_to(slots),
               (r["q_tilde"][...], r["lam_pre"][...], o))
  r["o"][...] = o.astype(r["o"].dtype)

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    _clear_dead(slots, x.m_end())
    _copy(slots, r["final"].at[bh, vb], sem)


class _Grads(NamedTuple):
  """Cotangent accumulators of one reverse chunk."""
  q_tilde: jax.Array      # [C, Dk]
  k_hat: jax.Array        # [C, Dk]
  k_gamma: jax.Array      # [C, Dk] (zero for Mamba-2)
  v: jax.Array            # [C, bv]
  end_decay: jax.Array    # [1, 1]
  lam_pre: jax.Array      # [C, K]


def _reverse_chunk(x: _Chunk, r, load, dslots, do, gdn: bool) -> _Grads:
  """Gradients of chunk n and, in place in `dslots`, the slot cotangents at its start."""
  q_tilde, lam = r["q_tilde"][...], r["lam_pre"][...]
  zero = jnp.zeros((x.kh.shape[1], x.v.shape[1]), do.dtype)

  def slot_grads(j, d_carry, grads: _Grads):
    """Readout gradients of pre-chunk slot j; its cotangent d_carry + Q̃ᵀ(Λ_pre[:, j] ⊙ dO)."""
    s = load(j)
    lam_rows = jnp.sum(do * dot(q_tilde, s), axis=1, keepdims=True)
    weighted = pick_lane(lam, j) * do
    dslots[j] = d_carry + dot(q_tilde, weighted, TN)
    return grads._replace(q_tilde=grads.q_tilde + dot(weighted, s, NT),
                          lam_pre=jnp.where(lanes(lam.shape[1]) == j, lam_rows, grads.lam_pre)), s

  def block(i, grads: _Grads):
    b = x.m_end() - 1 - i                                                 # decreasing
    d = dslots[b]
    members = x.members == b
    kh_d = dot(x.kh, d)                                                   # [C, bv]
    grads = grads._replace(v=grads.v + jnp.where(members, kh_d, 0.0),
                           k_hat=grads.k_hat + jnp.where(members, dot(x.v, d, NT), 0.0))
    d_carry = x.gend * d
    if gdn:
      d_carry = d_carry - dot(x.kg, kh_d, TN)

    def absorb(j, carry):
      grads, s = slot_grads(j, d_carry, carry[0])
      return grads, carry[1] + s

    grads, total = _loop(x.first(b), x.first(b + 1), absorb, (grads, zero))
    grads = grads._replace(end_decay=grads.end_decay + jnp.sum(d * total, axis=(0, 1),
                                                               keepdims=True))
    if gdn:
      grads = grads._replace(k_hat=grads.k_hat - dot(dot(x.kg, total), d, NT),
                             k_gamma=grads.k_gamma - dot(kh_d, total, NT))
    return grads

  zero_k = jnp.zeros(x.kh.shape, do.dtype)
  grads = _Grads(zero_k, zero_k, zero_k, dot(r["w"][...], do, TN), jnp.zeros((1, 1), do.dtype),
                 jnp.zeros(lam.shape, do.dtype))
  grads = _loop(0, x.m_end(), block, grads)
  return _loop(x.first(x.m_end()), x.m_pre(), lambda j, g: slot_grads(j, zero, g)[0], grads)


def _schedule(step, group: int, num_groups: int):
  """Backward step -> (group g, phase p, recompute?, chunk n) (module docstring)."""
  period = 2 * group - 1
  g = num_groups - 1 - lax.div(step, jnp.int32(period))     # step >= 0: truncation is floor
  p = lax.rem(step, jnp.int32(period))
  recompute = p < group - 1
  return g, p, recompute, jnp.where(recompute, g * group + p, g * group + period - 1 - p)


def _backward_kernel(*refs, names, group: int, num_chunks: int, gdn: bool):
  r = dict(zip(names, refs))
  bh, vb, step = (pl.program_id(i) for i in range(3))
  states, dslots, sem = r["states"], r["dslots"], r["sem"]
  g, p, recompute, n = _schedule(step, group, -(-num_chunks // group))

  @pl.when(step == 0)
  def _():
    _copy(r["dfinal"].at[bh, vb], dslots, sem)
    r["d_end_decay"][...] = jnp.zeros(r["d_end_decay"].shape, r["d_end_decay"].dtype)

  @pl.when(p == 0)
  def _():
    _copy(r["ckpt"].at[bh, vb, g], states.at[jnp.int32(0)], sem)

  @pl.when(recompute & (n + 1 < num_chunks))
  def _():
    _advance(_load_chunk(r, n), lambda j: states[p, j], _store_to(states, p + 1))

  @pl.when(jnp.logical_not(recompute) & (n < num_chunks))
  def _():
    x = _load_chunk(r, n)
    do = r["do"][...].astype(x.v.dtype)
    grads = _reverse_chunk(x, r, lambda j: states[n - g * group, j], dslots, do, gdn)
    for name in ("q_tilde", "k_hat", "v", "lam_pre") + (("k_gamma",) if gdn else ()):
      r["d_" + name][...] = getattr(grads, name)
    rows = lax.broadcasted_iota(jnp.int32, (do.shape[0],) * 2, 0)
    cols = lax.broadcasted_iota(jnp.int32, (do.shape[0],) * 2, 1)
    r["d_w"][...] = jnp.where(rows >= cols, dot(do, x.v, NT), 0.0)
    row = r["d_end_decay"]
    row[...] = jnp.where(lanes(row.shape[1]) == n, grads.end_decay, row[...])

  @pl.when(step == pl.num_programs(2) - 1)                                # chunk 0 done
  def _():
    _clear_dead(dslots, r["scalars"][0, 0])
    _copy(dslots, r["d_s0"].at[bh, vb], sem)


# --- pallas_calls ------------------------------------------------------------------------------


def _specs(x: _Inputs, layout: _Layout, chunk_of, reverse_chunk_of, bv: int):
  """Input BlockSpecs on the grid (bh, vb, step): chunk blocks at `chunk_of(step)`, those used
  only by reverse steps at `reverse_chunk_of(step)`."""
  both = lambda f: (lambda i, j, s: (i, f(s), 0, 0))
  chunk = lambda a, f=chunk_of: pl.BlockSpec((None, None, *a.shape[2:]), both(f))
  return dict(
      q_tilde=chunk(x.q_tilde, reverse_chunk_of), k_hat=chunk(x.k_hat),
      k_gamma=None if x.k_gamma is None else chunk(x.k_gamma),
      end_decay=pl.BlockSpec((None, *x.end_decay.shape[1:]), lambda i, j, s: (i, 0, 0)),
      w=chunk(x.w, reverse_chunk_of),
      v=pl.BlockSpec((None, None, x.v.shape[2], bv), lambda i, j, s: (i, chunk_of(s), 0, j)),
      lam_pre=chunk(x.lam_pre, reverse_chunk_of),
      s0=pl.BlockSpec(memory_space=pl.ANY),
      scalars=pl.BlockSpec((None, None, *layout.scalars.shape[2:]), both(chunk_of),
                           memory_space=pltpu.SMEM),
      blk=chunk(layout.blk))


def _call(setup: Setup, kernel, name: str, grid, specs: dict, arrays: dict, outs: dict,
          scratch: dict):
  names = (*arrays, *outs, *scratch)
  results = pl.pallas_call(
      functools.partial(kernel, names=names),
      grid=grid,
      in_specs=[specs[k] for k in arrays],
      out_specs=[spec for _, spec in outs.values()],
      out_shape=[shape for shape, _ in outs.values()],
      scratch_shapes=list(scratch.values()),
      compiler_params=setup.compiler_params(2),
      interpret=setup.interpret_params(),
      name=f"dla_{name}",
  )(*arrays.values())
  return dict(zip(outs, results))


def _arrays(x: _Inputs, layout: _Layout) -> dict:
  return {k: a for k, a in (*x._asdict().items(), *layout._asdict().items()) if a is not None}


def _forward(setup: Setup, x: _Inputs, layout: _Layout):
  """-> (o `[BH, N, C, Dv]`, final states `[BH, NV, K, Dk, bv]`, checkpoints
  `[BH, NV, G, K, Dk, bv]`)."""
  bh, nv, k, dk, bv = x.s0.shape
  n = x.v.shape[1]
  acc = x.s0.dtype
  chunk_of = lambda s: s
  specs = _specs(x, layout, chunk_of, chunk_of, bv)
  sds, anywhere = jax.ShapeDtypeStruct, pl.BlockSpec(memory_space=pl.ANY)
  outs = dict(o=(sds(x.v.shape, acc), specs["v"]), final=(sds(x.s0.shape, acc), anywhere),
              ckpt=(sds((bh, nv, -(-n // setup.group), k, dk, bv), acc), anywhere))
  scratch = dict(slots=pltpu.VMEM((k, dk, bv), acc), sem=pltpu.SemaphoreType.DMA(()))
  out = _call(setup, functools.partial(_forward_kernel, group=setup.group), "slots_forward",
              (bh, nv, n), specs, _arrays(x, layout), outs, scratch)
  return out["o"], out["final"], out["ckpt"]


def _backward(setup: Setup, x: _Inputs, layout: _Layout, ckpt, do, dfinal) -> _Inputs:
  """Cotangents of the kernel-layout inputs (value-block partials summed)."""
  bh, nv, k, dk, bv = x.s0.shape
  n, c = x.v.shape[1:3]
  acc = x.s0.dtype
  group, num_groups = setup.group, ckpt.shape[2]

  def chunk_of(step):
    return jnp.minimum(_schedule(step, group, num_groups)[3], n - 1)

  def reverse_chunk_of(step):
    g, _, recompute, chunk = _schedule(step, group, num_groups)
    return jnp.minimum(jnp.where(recompute, g * group + group - 1, chunk), n - 1)

  specs = _specs(x, layout, chunk_of, reverse_chunk_of, bv)
  arrays = _arrays(x, layout) | dict(ckpt=ckpt, do=do, dfinal=dfinal)
  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  specs.update(ckpt=anywhere, dfinal=anywhere, do=pl.BlockSpec(
      (None, None, c, bv), lambda i, j, s: (i, reverse_chunk_of(s), 0, j)))
  sds = jax.ShapeDtypeStruct
  partial = lambda *shape: (sds((bh, nv, n, *shape), acc), pl.BlockSpec(
      (None, None, None, *shape), lambda i, j, s: (i, j, reverse_chunk_of(s), 0, 0)))
  outs = dict(d_q_tilde=partial(c, dk), d_k_hat=partial(c, dk), d_w=partial(c, c),
              d_lam_pre=partial(c, k),
              d_v=(sds(x.v.shape, acc), specs["do"]),
              d_end_decay=(sds((bh, nv, 1, n), acc),
                           pl.BlockSpec((None, None, 1, n), lambda i, j, s: (i, j, 0, 0))),
              d_s0=(sds(x.s0.shape, acc), anywhere))
  if x.k_gamma is not None:
    outs["d_k_gamma"] = partial(c, dk)
  scratch = dict(states=pltpu.VMEM((group, k, dk, bv), acc), dslots=pltpu.VMEM((k, dk, bv), acc),
                 sem=pltpu.SemaphoreType.DMA(()))
  kernel = functools.partial(_backward_kernel, group=group, num_chunks=n,
                             gdn=x.k_gamma is not None)
  out = _call(setup, kernel, "slots_backward", (bh, nv, num_groups * (2 * group - 1)), specs,
              arrays, outs, scratch)
  total = lambda name: None if name not in out else jnp.sum(out[name], axis=1)
  return _Inputs(q_tilde=total("d_q_tilde"), k_hat=total("d_k_hat"),
                 k_gamma=total("d_k_gamma"), end_decay=total("d_end_decay"), w=total("d_w"),
                 v=out["d_v"], lam_pre=total("d_lam_pre"), s0=out["d_s0"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _slot_pass(setup: Setup, x: _Inputs, layout: _Layout):
  return _forward(setup, x, layout)[:2]


def _slot_pass_fwd(setup: Setup, x: _Inputs, layout: _Layout):
  o, final, ckpt = _forward(setup, x, layout)
  return (o, final), (x, layout, ckpt)


def _slot_pass_bwd(setup: Setup, residuals, cotangents):
  x, layout, ckpt = residuals
  do, dfinal = cotangents
  grads = _backward(setup, x, layout, ckpt, do.astype(ckpt.dtype), dfinal.astype(ckpt.dtype))
  grads = jax.tree.map(lambda g, a: g.astype(a.dtype), grads, x)
  return grads, _Layout(None, None)


_slot_pass.defvjp(_slot_pass_fwd, _slot_pass_bwd)


def slot_pass(setup: Setup, x: SlotInputs, layout: SlotLayout):
  """Readout and slot states (the `Kernels.slot_pass` of `dla_common`): (o `[BH, N, C, Dv]`,
  final slot states `[BH, K, Dk, Dv]`). The layout glue (head padding, value blocks of the
  states, `[C, K]` λ weights, packed layout scalars) is XLA outside the `custom_vjp`, so autodiff
  carries the cotangents through it."""
  bh, n, c, dk = x.q_tilde.shape
  dv = x.v.shape[-1]
  k = x.s0.shape[1]
  hm, bv = setup.head_multiple, setup.block_v
  s0 = pad_last(pad_last(x.s0, hm, -2), hm)                               # [BH, K, Dk', Dv']
  dkp, dvp = s0.shape[-2:]
  s0 = jnp.moveaxis(s0.reshape(bh, k, dkp, dvp // bv, bv), 3, 1)          # [BH, NV, K, Dk', bv]
  kernel_x = _Inputs(q_tilde=pad_last(x.q_tilde, hm), k_hat=pad_last(x.k_hat, hm),
                     k_gamma=pad_last(x.k_gamma, hm), end_decay=x.end_decay[:, None, :],
                     w=x.w, v=pad_last(x.v, hm), lam_pre=jnp.swapaxes(x.lam_pre, -1, -2), s0=s0)
  scalars = jnp.concatenate([layout.counts, layout.first], axis=-1)
  kernel_layout = _Layout(scalars=scalars[:, :, None, :].astype(jnp.int32),
                          blk=layout.blk[:, :, None, :].astype(jnp.int32))
  o, final = _slot_pass(setup, kernel_x, kernel_layout)
  final = jnp.moveaxis(final, 1, 3).reshape(bh, k, dkp, dvp)
  return o[..., :dv], final[:, :, :dk, :dv]

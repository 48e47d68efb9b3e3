"""DLA's multi-state readout and slot-state pass (spec dla.md §7.2 steps 3–4, §7.3) as one
Triton-lowered Pallas kernel per direction, with a `custom_vjp`.

Grid `(B·H, Dv/BV)`: one program per (batch·head, value block) loops over the N chunks. The K
slot states `[K, Dk, BV]` of a chunk start live in HBM and are streamed slot by slot: the forward
ping-pongs them through a workspace `[2, K, Dk, BV]` and keeps those of every R-th chunk start
(R = `remat_every`) as checkpoints `[⌈N/R⌉, K, Dk, BV]`, the residual of the backward; the
backward walks the checkpoint groups in reverse, recomputes a group's chunk-start states into
`[R, K, Dk, BV]` (the state part of the forward, without readout), then runs its chunks in
reverse. Per chunk n, with the chunk's
quantities (XLA, `dla_common`): Q̃, K̂, Kγ = diag(γ)K `[C, Dk]`, γ_end, the λ-weighted
intra-chunk weights `W = Λ_in ⊙ A_in [C, C]`, the pre-chunk λ weights `Λ_pre [K, C]` (zero for
dead slots), and the block layout at the chunk end: `blk [C]` (block of each token, −1 if none)
and `first [K+1]` (pre-chunk slots `first[b] ≤ j < first[b+1]` merge into block b; slots from
`first[m_end]` to `m_pre` were dropped by a segment reset):

  forward   o = W V + Σ_{j<m_pre} Λ_pre[j] ⊙ (Q̃ S_j)
            S'_b = F(Σ_{j→b} S_j) + (1[blk = b] ⊙ K̂)ᵀ V,   F P = γ_end P − δ K̂ᵀ (Kγ P)
  backward  chunks in reverse, carrying the slot cotangents D_b of the chunk end (a ping-pong
            workspace `[2, K, Dk, BV]`):
            dV = Wᵀ dO + Σ_b 1[blk = b] ⊙ (K̂ D_b),  dW = tril(dO Vᵀ)
            dK̂ = Σ_b 1[blk = b] ⊙ (V D_bᵀ) − δ (Kγ P_b) D_bᵀ,  dKγ = −δ (K̂ D_b) P_bᵀ
            dγ_end = Σ_b ⟨D_b, P_b⟩,  dΛ_pre[j] = rowdot(dO, Q̃ S_j),
            dQ̃ = Σ_j (Λ_pre[j] ⊙ dO) S_jᵀ
            D_j (chunk start) = γ_end D_b − δ Kγᵀ (K̂ D_b) + Q̃ᵀ (Λ_pre[j] ⊙ dO)   for j → b
  (P_b = Σ_{j→b} S_j; a merge copies the cotangent to both children, an append starts a fresh
  one, a dropped slot gets the readout term only.) Cotangents contracted over Dv (dQ̃, dK̂, dKγ,
  dW, dΛ_pre, dγ_end) are written per value block and summed in XLA.

Per chunk and program: `m_pre` readout matmuls `[C, Dk]·[Dk, BV]`, `m_end` masked write matmuls
`[Dk, C]·[C, BV]` (GDN: two more per block for F), i.e. O(K·C·Dk·BV), and 2·K·Dk·BV state
traffic; the backward about twice that. Stores then loads of HBM within a program are ordered by
`debug_barrier` after every chunk (compiled mode only; interpret mode is sequential).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dlax_kernels.dla_common import SlotInputs, SlotLayout

_SQ = pl.squeezed


class SlotConfig(NamedTuple):
  """Static: GDN (δ = 1) or Mamba-2, the value block, chunks per checkpoint group, interpret
  mode, launch parameters."""
  gdn: bool
  block_v: int
  group: int
  interpret: bool
  num_warps: int = 4

  def params(self):
    return None if self.interpret else plt.CompilerParams(num_warps=self.num_warps,
                                                          num_stages=1)

  def barrier(self):
    if not self.interpret:
      plt.debug_barrier()


def _dot(a, b, contract=(1, 0)):
  """`a @ b` contracting a's axis `contract[0]` with b's `contract[1]`, accumulated in fp32.

  With a 16-bit operand (the chunk inputs of bf16 calls) both operands are rounded to it and the
  product runs on tensor cores, as in fla's kernels (slot states stay fp32 in HBM); otherwise it
  is IEEE fp32 (fp64 in interpret mode)."""
  dims = (((contract[0],), (contract[1],)), ((), ()))
  narrow = [x.dtype for x in (a, b) if jnp.dtype(x.dtype).itemsize == 2]
  if narrow:
    return lax.dot_general(a.astype(narrow[0]), b.astype(narrow[0]), dims,
                           preferred_element_type=jnp.float32)
  acc = jnp.promote_types(jnp.float32, jnp.promote_types(a.dtype, b.dtype))
  return lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def _loop(lower, upper, body, init):
  return lax.fori_loop(jnp.asarray(lower, jnp.int32), jnp.asarray(upper, jnp.int32), body, init)


class _Chunk(NamedTuple):
  """One chunk's blocks, loaded in the kernel."""
  qt: jax.Array
  kh: jax.Array
  kg: jax.Array | None
  gend: jax.Array
  v: jax.Array
  blk: jax.Array


def _load_chunk(refs: SlotInputs, layout: SlotLayout, n) -> _Chunk:
  kg = None if refs.k_gamma is None else refs.k_gamma[n]
  return _Chunk(refs.q_tilde[n], refs.k_hat[n], kg, refs.end_decay[n], refs.v[n],
                layout.blk[n])


def _transport(x: _Chunk, total):
  """F P = γ_end P − δ K̂ᵀ (Kγ P) for a `[Dk, BV]` block."""
  out = x.gend * total
  return out if x.kg is None else out - _dot(x.kh, _dot(x.kg, total), (0, 0))


def _unpack(refs, cfg: SlotConfig):
  """(SlotInputs of refs, SlotLayout of refs, the remaining refs)."""
  n_in = len(SlotInputs._fields) - (not cfg.gdn)
  ins = list(refs[:n_in])
  if not cfg.gdn:
    ins.insert(2, None)
  return SlotInputs(*ins), SlotLayout(*refs[n_in:n_in + 3]), refs[n_in + 3:]


def _chunk_forward(refs: SlotInputs, layout: SlotLayout, n, load, store, readout: bool):
  """Chunk n: the slot states at its end (`store(b, S'_b)`, from `load(j)` = S_j at its start)
  and, with `readout`, its output o `[C, BV]`."""
  x = _load_chunk(refs, layout, n)
  first = layout.first
  acc = jnp.promote_types(jnp.float32, x.v.dtype)                       # the states' dtype
  zero = jnp.zeros((x.kh.shape[1], x.v.shape[1]), acc)

  def read(j, o):
    s = load(j)
    if readout:
      o = o + refs.lam_pre[n, j][:, None] * _dot(x.qt, s)
    return o, s

  def block(b, o):
    def absorb(j, carry):
      o, s = read(j, carry[0])
      return o, carry[1] + s

    o, total = _loop(first[n, b], first[n, b + 1], absorb, (o, zero))
    members = jnp.where((x.blk == b)[:, None], x.kh, 0.0)
    store(b, _transport(x, total) + _dot(members, x.v, (0, 0)))
    return o

  m_pre, m_end = layout.counts[n, 0], layout.counts[n, 1]
  o = _dot(refs.w[n], x.v) if readout else jnp.zeros((), acc)
  o = _loop(0, m_end, block, o)
  if readout:
    o = _loop(first[n, m_end], m_pre, lambda j, o: read(j, o)[0], o)   # dropped by a reset
  return o


def _writer(ref, index):
  """`(j, value) -> ref[index, j] = value`: stores one slot `[Dk, BV]` of a slot stack."""

  def write(j, value):
    ref[index, j] = value.astype(ref.dtype)

  return write


def _copy_slots(dst, src, count):
  """`dst(j, src(j))` for the first `count` slots."""

  def copy(j, _):
    dst(j, src(j))

  _loop(0, count, copy, None)


def _forward_kernel(*refs, cfg: SlotConfig):
  """o, the final slot states and a checkpoint of the slot states every `cfg.group` chunks;
  the states of consecutive chunks ping-pong through `ws [2, K, Dk, BV]`."""
  x_refs, layout, (o_ref, final_ref, ckpt_ref, ws_ref) = _unpack(refs, cfg)
  num_chunks = o_ref.shape[0]
  m_init = layout.counts[0, 0]

  _copy_slots(_writer(ws_ref, 0), lambda j: x_refs.s0[j], m_init)
  _copy_slots(_writer(ckpt_ref, 0), lambda j: x_refs.s0[j], m_init)
  cfg.barrier()

  def chunk(n, _):
    nxt = (n + 1) % 2
    checkpoint = ((n + 1) % cfg.group == 0) & (n + 1 < num_chunks)

    def store(b, value):
      _writer(ws_ref, nxt)(b, value)

      @pl.when(checkpoint)
      def _():
        _writer(ckpt_ref, (n + 1) // cfg.group)(b, value)

    o = _chunk_forward(x_refs, layout, n, lambda j: ws_ref[n % 2, j], store, readout=True)
    o_ref[n] = o.astype(o_ref.dtype)
    cfg.barrier()

  _loop(0, num_chunks, chunk, None)
  m_final = layout.counts[num_chunks - 1, 1]

  def copy_final(j, _):
    final_ref[j] = jnp.where(j < m_final, ws_ref[num_chunks % 2, j], 0.0)

  _loop(0, final_ref.shape[0], copy_final, None)


def _chunk_backward(cfg: SlotConfig, refs: SlotInputs, layout: SlotLayout, n, load, d_load,
                    d_store, do, outs):
  """Chunk n in reverse: its input cotangents, and the slot cotangents at its start
  (`d_store(j, D_j)`, from `d_load(b)` = D_b at its end and `load(j)` = S_j at its start)."""
  dv_ref, dqt_ref, dkh_ref, dkg_ref, dgend_ref, dw_ref, dlp_ref = outs
  x = _load_chunk(refs, layout, n)
  first = layout.first
  c = do.shape[0]
  acc = do.dtype
  zero = jnp.zeros((x.kh.shape[1], x.v.shape[1]), acc)
  zero_k = jnp.zeros(x.kh.shape, acc)

  def slot_grads(j, d_carry, dqt):
    """Readout grads of pre-slot j; its chunk-start cotangent d_carry + Q̃ᵀ(Λ_pre[j] ⊙ dO)."""
    s = load(j)
    dlp_ref[n, j] = jnp.sum(do * _dot(x.qt, s), axis=1)
    weighted = refs.lam_pre[n, j][:, None] * do
    d_store(j, d_carry + _dot(x.qt, weighted, (0, 0)))
    return dqt + _dot(weighted, s, (1, 1)), s

  def block(b, carry):
    dqt, dkh, dkg, dv, dgend = carry
    d = d_load(b)
    members = (x.blk == b)[:, None]
    kh_d = _dot(x.kh, d)                                                # [C, BV]
    dv = dv + jnp.where(members, kh_d, 0.0)
    dkh = dkh + jnp.where(members, _dot(x.v, d, (1, 1)), 0.0)
    d_carry = x.gend * d
    if cfg.gdn:
      d_carry = d_carry - _dot(x.kg, kh_d, (0, 0))

    def absorb(j, inner):
      dqt, s = slot_grads(j, d_carry, inner[0])
      return dqt, inner[1] + s

    dqt, total = _loop(first[n, b], first[n, b + 1], absorb, (dqt, zero))
    dgend = dgend + jnp.sum(d * total)
    if cfg.gdn:
      dkh = dkh - _dot(_dot(x.kg, total), d, (1, 1))
      dkg = dkg - _dot(kh_d, total, (1, 1))
    return dqt, dkh, dkg, dv, dgend

  m_pre, m_end = layout.counts[n, 0], layout.counts[n, 1]
  dv = _dot(refs.w[n], do, (0, 0))
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  dw_ref[n] = jnp.where(rows >= cols, _dot(do, x.v, (1, 1)), 0.0)
  init = (zero_k, zero_k, zero_k, dv, jnp.zeros((), acc))
  dqt, dkh, dkg, dv, dgend = _loop(0, m_end, block, init)
  dqt = _loop(first[n, m_end], m_pre, lambda j, dqt: slot_grads(j, zero, dqt)[0], dqt)
  dv_ref[n] = dv
  dqt_ref[n] = dqt
  dkh_ref[n] = dkh
  if cfg.gdn:
    dkg_ref[n] = dkg
  dgend_ref[n] = dgend


def _backward_kernel(*refs, cfg: SlotConfig):
  """Checkpoint groups in reverse: recompute the group's chunk-start states into
  `gs [R, K, Dk, BV]` from its checkpoint, then its chunks in reverse, the slot cotangents
  ping-ponging through `dws [2, K, Dk, BV]`."""
  x_refs, layout, rest = _unpack(refs, cfg)
  ckpt_ref, do_ref, dsf_ref, *outs = rest
  if not cfg.gdn:
    outs.insert(3, None)
  *grad_refs, ds0_ref, dws_ref, gs_ref = outs
  num_chunks = do_ref.shape[0]
  num_groups = ckpt_ref.shape[0]
  acc = dws_ref.dtype
  _copy_slots(_writer(dws_ref, num_chunks % 2), lambda b: dsf_ref[b],
              layout.counts[num_chunks - 1, 1])
  cfg.barrier()

  def group(i, _):
    g = num_groups - 1 - i
    start = g * cfg.group
    stop = jnp.minimum(start + cfg.group, num_chunks)
    _copy_slots(_writer(gs_ref, 0), lambda j: ckpt_ref[g, j], layout.counts[start, 0])
    cfg.barrier()

    def recompute(n, _):
      r = n - start
      _chunk_forward(x_refs, layout, n, lambda j: gs_ref[r, j], _writer(gs_ref, r + 1),
                     readout=False)
      cfg.barrier()

    _loop(start, stop - 1, recompute, None)

    def chunk(k, _):
      n = stop - 1 - k
      cur = n % 2
      _chunk_backward(cfg, x_refs, layout, n, lambda j: gs_ref[n - start, j],
                      lambda b: dws_ref[1 - cur, b], _writer(dws_ref, cur),
                      do_ref[n].astype(acc), grad_refs)
      cfg.barrier()

    _loop(0, stop - start, chunk, None)

  _loop(0, num_groups, group, None)
  m_init = layout.counts[0, 0]

  def copy_initial(j, _):
    ds0_ref[j] = jnp.where(j < m_init, dws_ref[0, j], 0.0)

  _loop(0, ds0_ref.shape[0], copy_initial, None)


# --- pallas_calls ------------------------------------------------------------------------------


def _spec(shape, blocked_v: bool, block_v: int, per_vblock: bool = False):
  """BlockSpec of a `[BH, (NV,) ...]` array: squeeze BH (and the value-block axis of a
  per-value-block output); block the last axis by `block_v` when `blocked_v`."""
  rest = list(shape[2:] if per_vblock else shape[1:])
  if blocked_v:
    rest[-1] = block_v
  lead = (_SQ, _SQ) if per_vblock else (_SQ,)

  def index_map(bh, vb):
    tail = [0] * (len(rest) - 1) + [vb if blocked_v else 0]
    return (bh, vb, *tail) if per_vblock else (bh, *tail)

  return pl.BlockSpec((*lead, *rest), index_map)


_V_BLOCKED = SlotInputs(False, False, False, False, False, True, False, True)


def _present(tree):
  return [a for a in tree if a is not None]


def _in_specs(cfg: SlotConfig, x: SlotInputs, layout: SlotLayout):
  specs = [_spec(a.shape, blocked, cfg.block_v) for a, blocked in zip(x, _V_BLOCKED)
           if a is not None]
  return specs + [_spec(a.shape, False, cfg.block_v) for a in layout]


def _num_groups(cfg: SlotConfig, num_chunks: int) -> int:
  return -(-num_chunks // cfg.group)


def _forward_call(cfg: SlotConfig, x: SlotInputs, layout: SlotLayout):
  """-> (o `[BH, N, C, Dv]`, final states `[BH, K, Dk, Dv]`, checkpoints `[BH, G, K, Dk, Dv]`)."""
  bh, n, c, _ = x.q_tilde.shape
  k, dk, dv = x.s0.shape[1:]
  acc = x.s0.dtype
  shapes = [(bh, n, c, dv), (bh, k, dk, dv), (bh, _num_groups(cfg, n), k, dk, dv),
            (bh, 2, k, dk, dv)]                                          # ..., workspace
  o, final, ckpt, _ = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(bh, dv // cfg.block_v),
      in_specs=_in_specs(cfg, x, layout),
      out_specs=[_spec(s, True, cfg.block_v) for s in shapes],
      out_shape=[jax.ShapeDtypeStruct(s, acc) for s in shapes],
      compiler_params=cfg.params(),
      interpret=cfg.interpret,
  )(*_present(x), *layout)
  return o, final, ckpt


def _backward_call(cfg: SlotConfig, x: SlotInputs, layout: SlotLayout, ckpt, do, dsf):
  bh, n, c, dk = x.q_tilde.shape
  k, dv = x.s0.shape[1], x.s0.shape[-1]
  nv = dv // cfg.block_v
  outs = [  # (shape, value-blocked, per value block)
      ((bh, n, c, dv), True, False),            # dV
      ((bh, nv, n, c, dk), False, True),        # dQ̃
      ((bh, nv, n, c, dk), False, True),        # dK̂
      ((bh, nv, n, c, dk), False, True) if cfg.gdn else None,   # dKγ
      ((bh, nv, n), False, True),               # dγ_end
      ((bh, nv, n, c, c), False, True),         # dW
      ((bh, nv, n, k, c), False, True),         # dΛ_pre
      ((bh, k, dk, dv), True, False),           # dS0
      ((bh, 2, k, dk, dv), True, False),        # workspace: slot cotangents
      ((bh, cfg.group, k, dk, dv), True, False),   # workspace: a group's states
  ]
  outs = _present(outs)
  in_specs = _in_specs(cfg, x, layout) + [_spec(a.shape, True, cfg.block_v)
                                          for a in (ckpt, do, dsf)]
  results = pl.pallas_call(
      functools.partial(_backward_kernel, cfg=cfg),
      grid=(bh, nv),
      in_specs=in_specs,
      out_specs=[_spec(s, blocked, cfg.block_v, per_vb) for s, blocked, per_vb in outs],
      out_shape=[jax.ShapeDtypeStruct(s, x.s0.dtype) for s, _, _ in outs],
      compiler_params=cfg.params(),
      interpret=cfg.interpret,
  )(*_present(x), *layout, ckpt, do, dsf)
  results = list(results[:-2])
  if not cfg.gdn:
    results.insert(3, None)
  return results


# --- custom_vjp --------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def slot_pass(cfg: SlotConfig, x: SlotInputs, layout: SlotLayout):
  """Readout and slot states: (o `[BH, N, C, Dv]`, final slot states `[BH, K, Dk, Dv]`)."""
  return _slot_pass_fwd(cfg, x, layout)[0]


def _slot_pass_fwd(cfg: SlotConfig, x: SlotInputs, layout: SlotLayout):
  o, final, ckpt = _forward_call(cfg, x, layout)
  return (o, final), (x, layout, ckpt)


def _slot_pass_bwd(cfg: SlotConfig, residuals, cotangents):
  x, layout, ckpt = residuals
  do, dsf = cotangents
  dv, dqt, dkh, dkg, dgend, dw, dlp, ds0 = _backward_call(
      cfg, x, layout, ckpt, do.astype(ckpt.dtype), dsf.astype(ckpt.dtype))
  k = x.s0.shape[1]
  live = jnp.arange(k)[:, None] < layout.counts[:, :, 0, None, None]     # [BH, N, K, 1]
  dlp = jnp.where(live, jnp.sum(dlp, axis=1), 0.0)
  total = lambda a: None if a is None else jnp.sum(a, axis=1)
  grads = SlotInputs(q_tilde=total(dqt), k_hat=total(dkh), k_gamma=total(dkg),
                     end_decay=total(dgend), w=total(dw), v=dv, lam_pre=dlp, s0=ds0)
  grads = jax.tree.map(lambda g, a: g.astype(a.dtype), grads, x)
  return grads, SlotLayout(None, None, None)


slot_pass.defvjp(_slot_pass_fwd, _slot_pass_bwd)

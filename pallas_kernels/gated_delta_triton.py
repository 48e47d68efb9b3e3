"""Gated DeltaNet (fla's `chunk_gated_delta_rule`) as Pallas kernels lowered through Triton.

Recurrence, per (batch, head): `S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ`,
`o_t = S_tᵀ (scale q_t)`, `α_t = exp g_t`; S is `[Dk, Dv]`.

Chunked (WY/UT) form, chunk size C, per chunk with local index i (see dlax/ops/gated_delta/
chunked.py): G = chunk-local cumsum of g, γ = exp G, Γ[i,s] = exp(G_i − G_s),
L = tril_strict(diag(β) (K Kᵀ ⊙ Γ)), M = (I + L)⁻¹, and with S the state entering the chunk

    W  = M diag(βγ) K      U' = M diag(β) V                        (intra-chunk, parallel)
    U  = U' − W S          S_next = γ_C S + Kᵀ diag(exp(G_C − G)) U   (state pass, sequential)
    O  = scale diag(γ) Q S + P U,   P = scale (Q Kᵀ) ⊙ Γ ⊙ tril        (output, parallel)

Kernels (grid; N chunks, `NV = Dv / state_block_v`; q, k, v stay in the op's `[B, T, H, D]`
layout, gates and β are `[B, H, T]`; chunk-parallel kernels loop over Dv in `block_v` columns):

  forward
    `_intra_kernel`   (N, B, H)  K Kᵀ in blocks of `bs = min(16, C)` rows, forward substitution
                                 on the diagonal blocks and their block merge (fla's solve_tril)
                                 → M, stored (the backward reuses it) and read back whole after
                                 a barrier for W = M (diag(βγ) K), U' = M (diag(β) V).
    `_state_kernel`   (NV, B, H) loop over chunks: stores the states entering each chunk
                                 `h [B, H, N, Dk, Dv]` and U; returns the final state (fp32).
    `_output_kernel`  (N, B, H)  O from Q, K, U, h.
  backward (fla's decomposition; residuals q, k, v, g, β, S0, M, W, U'; h and U are recomputed
  by `_state_kernel`)
    `_dv_local_kernel`      (N, B, H)  dU_intra = Pᵀ dO.
    `_reverse_state_kernel` (NV, B, H) loop over chunks backwards: dS' (the cotangent of the
                                       state leaving each chunk) → `dh`, dU = dU_intra +
                                       diag(exp(G_C − G)) K dS', dS = γ_C dS' +
                                       scale (diag(γ)Q)ᵀ dO − Wᵀ dU; returns d(initial state).
    `_dqkwg_kernel`         (N, B, H)  dQ, dK and dG through P, the state readout and the
                                       state update; dW = −dU Sᵀ.
    `_wy_bwd_kernel`        (N, B, H)  through W, U' = M diag(·)[K | V]: dK, dV, dβ, dG (with
                                       dM → dL = −Mᵀ dM Mᵀ), plus the `_dqkwg` partials.
  XLA glue: padding T to a multiple of C and head dims to powers of two >= 16, casts, the
  chunk-local cumsum of g (JAX differentiates it) and the `[B, T, H] ↔ [B, H, T]` transposes
  of g and β.

Matrix products accumulate in fp32 with operands in the inputs' dtype (`md`): bf16 operands
use the tensor cores, fp32 operands run in full fp32 (`Precision.HIGHEST`, not tf32) so fp32
results match an fp64 reference to ~1e-6. The diagonal-block inverses and their merge stay in
fp32 (tf32 products for bf16 inputs, as fla). Kernels take float32 or bfloat16 q/k/v; the gate
and β are used in fp32. Compiled (GPU) runs need C a power of two >= 16; interpret mode (CPU)
takes any power of two.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dlax_kernels.common import next_power_of_2, pad_time, triton_interpret

_SUB_BLOCK = 16          # rows of the diagonal blocks inverted by forward substitution
_MIN_DIM = 16            # smallest head dim / chunk for Triton's matrix units
_DTYPES = (jnp.float32, jnp.bfloat16)
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Static kernel parameters. The state passes take `state_block_v` Dv columns per program and
  run with `state_warps` warps, `state_stages` pipeline stages; the chunk-parallel kernels loop
  over Dv in blocks of `block_v` (None: 128 for bf16, 32 for fp32, whose full-fp32 products need
  more shared memory) with `intra_warps` (WY), `warps` (output, dv_local) and `bwd_warps`
  (dqkwg, wy_bwd) warps."""
  scale: float
  chunk_size: int
  interpret: bool
  block_v: int | None = None
  state_block_v: int = 64
  intra_warps: int = 2
  warps: int = 4
  bwd_warps: int = 8
  state_warps: int = 4
  state_stages: int = 2

  @property
  def sub_block(self) -> int:
    return min(_SUB_BLOCK, self.chunk_size)


# ---------------------------------------------------------------------------------------------
# In-kernel helpers


def _mm(a, b, md, *, trans_a: bool = False, trans_b: bool = False):
  """`a @ b` (optionally transposed operands) with operands cast to `md`, fp32 accumulation."""
  precision = lax.Precision.HIGHEST if md == f32 else None
  return plgpu.dot(a.astype(md), b.astype(md), trans_a, trans_b, precision=precision)


def _mm32(a, b, md):
  """fp32 product for the triangular inverse: exact fp32 for fp32 inputs, tf32 for bf16."""
  return plgpu.dot(a, b, precision=lax.Precision.HIGHEST if md == f32 else None)


def _iota(shape, axis):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _lower_mask(n: int, strict: bool):
  row, col = _iota((n, n), 0), _iota((n, n), 1)
  return row > col if strict else row >= col


def _decay(g_rows, g_cols, mask=None):
  """`exp(g_rows[i] − g_cols[s])`, zero outside `mask` (the exponent may overflow there)."""
  diff = g_rows[:, None] - g_cols[None, :]
  if mask is None:
    return jnp.exp(diff)
  return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _total(x):
  """Sum of a 2-D array to a scalar (one axis at a time)."""
  return jnp.sum(jnp.sum(x, axis=1), axis=0)


def _set_last(x, value):
  """`x` with `value` added to its last entry."""
  return jnp.where(_iota(x.shape, 0) == x.shape[0] - 1, x + value, x)


def _chunk(n, c: int):
  return pl.ds(pl.multiple_of(n * c, c), c)


def _over_column_blocks(width: int, block: int, body, init=None):
  """`body(cols, carry) -> carry` over the column blocks `pl.ds(j * block, block)` of `width`."""
  return lax.fori_loop(0, width // block,
                       lambda j, carry: body(pl.ds(pl.multiple_of(j * block, block), block),
                                             carry), init)


# ---------------------------------------------------------------------------------------------
# Forward kernels


def _diag_inverses(blocks):
  """`(I + L_b)⁻¹` for strictly lower-triangular `[bs, bs]` blocks, by forward substitution
  (row r of `Y = (I + L)⁻¹ − I` is `a + a Y` with `a = −L[r]`; all blocks share the loop)."""
  bs = blocks[0].shape[0]
  rows = _iota((bs, bs), 0)

  def substitute(r, inverses):
    out = []
    for lower, y in zip(blocks, inverses):
      a = -jnp.sum(jnp.where(rows == r, lower, 0.0), axis=0)
      a = a + jnp.sum(a[:, None] * y, axis=0)
      out.append(jnp.where(rows == r, a[None, :], y))
    return tuple(out)

  inverses = lax.fori_loop(2, bs, substitute, tuple(-lower for lower in blocks))
  eye = (rows == _iota((bs, bs), 1)).astype(f32)
  return [y + eye for y in inverses]


def _block_inverse(lower, md):
  """M = (I + L)⁻¹ from the lower blocks `lower[i][j]` (j <= i) of L: `M_ii` by forward
  substitution, then `M_ij = −M_ii Σ_{j<=m<i} L_im M_mj`."""
  nb = len(lower)
  inv = [[None] * nb for _ in range(nb)]
  for i, d in enumerate(_diag_inverses([lower[i][i] for i in range(nb)])):
    inv[i][i] = d
  for i in range(1, nb):
    for j in range(i - 1, -1, -1):
      acc = sum(_mm32(lower[i][m], inv[m][j], md) for m in range(j, i))
      inv[i][j] = -_mm32(inv[i][i], acc, md)
  return inv


def _intra_kernel(k_ref, v_ref, g_ref, beta_ref, m_ref, w_ref, u_ref, *, bs, md, bv, compiled):
  """One (chunk, batch, head): M = (I + L)⁻¹ from `bs`-row blocks (stored: the backward reuses
  it, and W, U' read it back whole), then W = M diag(βγ) K and U' = M diag(β) V."""
  c = k_ref.shape[0]
  nb = c // bs
  rows = [pl.ds(i * bs, bs) for i in range(nb)]
  ks = [k_ref[r, :] for r in rows]
  gs = [g_ref[r] for r in rows]
  betas = [beta_ref[r] for r in rows]
  strict = _lower_mask(bs, strict=True)
  lower = [[None] * nb for _ in range(nb)]
  for i in range(nb):
    for j in range(i + 1):
      gram = _mm(ks[i], ks[j], md, trans_b=True)
      lower[i][j] = gram * _decay(gs[i], gs[j], strict if i == j else None) * betas[i][:, None]
  inv = _block_inverse(lower, md)
  for i, r in enumerate(rows):
    for j in range(nb):
      block = inv[i][j] if j <= i else jnp.zeros((bs, bs), f32)
      m_ref[r, pl.ds(j * bs, bs)] = block.astype(m_ref.dtype)
  if compiled:
    plgpu.debug_barrier()          # the whole M, written by all threads, is read back below
  m, g, beta = m_ref[...], g_ref[...], beta_ref[...]
  xk = k_ref[...].astype(f32) * (beta * jnp.exp(g))[:, None]
  w_ref[...] = _mm(m, xk, md).astype(w_ref.dtype)

  def block(cols, carry):
    u_ref[:, cols] = _mm(m, v_ref[:, cols].astype(f32) * beta[:, None], md).astype(u_ref.dtype)
    return carry

  _over_column_blocks(u_ref.shape[1], bv, block)


def _state_kernel(k_ref, w_ref, u_free_ref, g_ref, s0_ref, h_ref, u_ref, final_ref, *, md):
  """One (Dv block, batch, head): the chunk loop `U = U' − W S`,
  `S ← γ_C S + Kᵀ diag(exp(G_C − G)) U`, storing S before each chunk (`h`) and U."""
  c = g_ref.shape[0] // h_ref.shape[0]

  def step(n, state):
    t = _chunk(n, c)
    h_ref[n] = state.astype(h_ref.dtype)
    u = u_free_ref[t, :].astype(f32) - _mm(w_ref[t, :], state, md)
    u_ref[t, :] = u.astype(u_ref.dtype)
    g = g_ref[t]
    g_last = g_ref[n * c + c - 1]
    update = _mm(k_ref[t, :], u * jnp.exp(g_last - g)[:, None], md, trans_a=True)
    return state * jnp.exp(g_last) + update

  final_ref[...] = lax.fori_loop(0, h_ref.shape[0], step, s0_ref[...].astype(f32))


def _intra_scores(q, k, g, scale, md):
  """P = scale (Q Kᵀ) ⊙ Γ ⊙ tril (inclusive), fp32 `[C, C]`."""
  mask = _lower_mask(g.shape[0], strict=False)
  return _mm(q, k, md, trans_b=True) * _decay(g, g, mask) * scale


def _output_kernel(q_ref, k_ref, u_ref, g_ref, h_ref, o_ref, *, scale, md, bv):
  """One (chunk, batch, head): O = scale diag(γ) Q S + P U, by Dv blocks."""
  q, g = q_ref[...], g_ref[...]
  scores = _intra_scores(q, k_ref[...], g, scale, md)
  q_decay = (scale * jnp.exp(g))[:, None]

  def block(cols, carry):
    o = _mm(q, h_ref[:, cols], md) * q_decay + _mm(scores, u_ref[:, cols], md)
    o_ref[:, cols] = o.astype(o_ref.dtype)
    return carry

  _over_column_blocks(o_ref.shape[1], bv, block)


# ---------------------------------------------------------------------------------------------
# Backward kernels


def _dv_local_kernel(q_ref, k_ref, g_ref, do_ref, du_ref, *, scale, md, bv):
  """One (chunk, batch, head): the intra-chunk part of dU, Pᵀ dO."""
  scores = _intra_scores(q_ref[...], k_ref[...], g_ref[...], scale, md)

  def block(cols, carry):
    du_ref[:, cols] = _mm(scores, do_ref[:, cols], md, trans_a=True).astype(du_ref.dtype)
    return carry

  _over_column_blocks(du_ref.shape[1], bv, block)


def _reverse_state_kernel(q_ref, k_ref, w_ref, g_ref, do_ref, du_local_ref, ds_final_ref,
                          dh_ref, du_ref, ds0_ref, *, scale, md):
  """One (Dv block, batch, head), chunks last to first; the carry dS' is the cotangent of the
  state leaving the chunk: stores it (`dh`) and dU, then steps it to the state entering."""
  n_chunks = dh_ref.shape[0]
  c = g_ref.shape[0] // n_chunks

  def step(i, ds):
    n = n_chunks - 1 - i
    t = _chunk(n, c)
    dh_ref[n] = ds.astype(dh_ref.dtype)
    g = g_ref[t]
    g_last = g_ref[n * c + c - 1]
    du = du_local_ref[t, :].astype(f32) + (
        _mm(k_ref[t, :], ds, md) * jnp.exp(g_last - g)[:, None])
    du_ref[t, :] = du.astype(du_ref.dtype)
    q = q_ref[t, :].astype(f32) * (scale * jnp.exp(g))[:, None]
    return (ds * jnp.exp(g_last) + _mm(q, do_ref[t, :], md, trans_a=True)
            - _mm(w_ref[t, :], du, md, trans_a=True))

  ds0_ref[...] = lax.fori_loop(0, n_chunks, step, ds_final_ref[...].astype(f32))


def _dqkwg_kernel(q_ref, k_ref, u_ref, g_ref, h_ref, dh_ref, do_ref, du_ref,
                  dq_ref, dk_ref, dw_ref, dg_ref, *, scale, md, bv):
  """One (chunk, batch, head): cotangents through O = scale diag(γ)QS + PU and
  S_next = γ_C S + Kᵀ diag(exp(G_C − G)) U, with S = h (entering) and dS' = dh (leaving);
  dW = −dU Sᵀ. Sums over Dv by blocks.

  dG_i = q_i·dq_i − k_i·dk_i (+ γ_C ⟨S, dS'⟩ + Σ k·dk_state at the last row)."""
  q, k, g = q_ref[...], k_ref[...], g_ref[...]
  c, dk_dim = q.shape

  def block(cols, acc):
    dscores, dq, dk, dw, dstate = acc
    h, dh, do, u = h_ref[:, cols], dh_ref[:, cols], do_ref[:, cols], u_ref[:, cols]
    return (dscores + _mm(do, u, md, trans_b=True), dq + _mm(do, h, md, trans_b=True),
            dk + _mm(u, dh, md, trans_b=True), dw - _mm(du_ref[:, cols], h, md, trans_b=True),
            dstate + _total(h.astype(f32) * dh.astype(f32)))

  rows = jnp.zeros((c, dk_dim), f32)
  init = (jnp.zeros((c, c), f32), rows, rows, rows, jnp.zeros((), f32))
  dscores, dq, dk, dw, dstate = _over_column_blocks(u_ref.shape[1], bv, block, init)
  dw_ref[...] = dw.astype(dw_ref.dtype)
  g_last = g_ref[c - 1]
  dq = dq * (scale * jnp.exp(g))[:, None]
  dk = dk * jnp.exp(g_last - g)[:, None]
  dg_last = dstate * jnp.exp(g_last) + _total(dk * k)
  dscores = dscores * _decay(g, g, _lower_mask(c, strict=False)) * scale
  dq = dq + _mm(dscores, k, md)
  dk = dk + _mm(dscores, q, md, trans_a=True)
  dg = jnp.sum(dq * q, axis=1) - jnp.sum(dk * k, axis=1)
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dg_ref[...] = _set_last(dg, dg_last)


def _wy_bwd_kernel(k_ref, v_ref, g_ref, beta_ref, m_ref, dw_ref, du_ref, dk_part_ref,
                   dg_part_ref, dk_ref, dv_ref, dbeta_ref, dg_ref, *, md, bv):
  """One (chunk, batch, head): cotangents through W = M Xk, U' = M Xv (Xk = diag(βγ)K,
  Xv = diag(β)V) and M = (I + L)⁻¹ (dL = −Mᵀ dM Mᵀ on the strict lower triangle), added to
  the `_dqkwg` partials dk, dG. The V side runs by Dv blocks."""
  k, g, beta, m, dw = k_ref[...], g_ref[...], beta_ref[...], m_ref[...], dw_ref[...]
  c = g.shape[0]
  kf = k.astype(f32)
  gamma = jnp.exp(g)
  xk = kf * (beta * gamma)[:, None]
  dxk = _mm(m, dw, md, trans_a=True)
  dk = dxk * (beta * gamma)[:, None]
  dbeta = jnp.sum(dxk * kf, axis=1) * gamma
  dg = jnp.sum(dxk * xk, axis=1)

  def v_block(cols, acc):
    dbeta, dm = acc
    v, du = v_ref[:, cols].astype(f32), du_ref[:, cols]
    dxv = _mm(m, du, md, trans_a=True)
    dv_ref[:, cols] = (dxv * beta[:, None]).astype(dv_ref.dtype)
    return (dbeta + jnp.sum(dxv * v, axis=1),
            dm + _mm(du, v * beta[:, None], md, trans_b=True))

  dbeta, dm = _over_column_blocks(v_ref.shape[1], bv, v_block,
                                  (dbeta, _mm(dw, xk, md, trans_b=True)))
  strict = _lower_mask(c, strict=True)
  dm = jnp.where(strict, dm, 0.0)
  dl = -_mm(m, _mm(dm, m, md, trans_b=True), md, trans_a=True)
  dl = dl * _decay(g, g, strict)                                    # dL ⊙ Γ
  gram = _mm(k, k, md, trans_b=True)
  dbeta = dbeta + jnp.sum(dl * gram, axis=1)
  dl_beta = dl * beta[:, None]
  dk = dk + _mm(dl_beta, k, md) + _mm(dl_beta, k, md, trans_a=True)
  dl_l = dl_beta * gram                                             # dL ⊙ L
  dg = dg + jnp.sum(dl_l, axis=1) - jnp.sum(dl_l, axis=0)
  dk_ref[...] = (dk + dk_part_ref[...].astype(f32)).astype(dk_ref.dtype)
  dbeta_ref[...] = dbeta
  dg_ref[...] = dg + dg_part_ref[...]


# ---------------------------------------------------------------------------------------------
# pallas_call plumbing


def _call(kernel, cfg: Config, grid, in_specs, out_specs, out_shape, name, *, warps: int,
          stages: int = 1):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, interpret=cfg.interpret, name=name,
                        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Grids and block specs over `[B, Tp, H, D]` rows, `[B, H, Tp]` gates and `[B, H, N, Dk, Dv]`
  states. Chunk-parallel kernels run on the grid (N, B, H) and loop over Dv in blocks of `bv`;
  the state passes run on (Dv / `state_bv`, B, H) and loop over the N chunks."""
  b: int
  h: int
  t: int
  c: int
  dk: int
  dv: int
  bv: int
  state_bv: int

  @classmethod
  def of(cls, q, v, cfg: Config) -> _Layout:
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    bv = cfg.block_v or (32 if q.dtype == f32 else 128)
    return cls(b, h, t, cfg.chunk_size, dk, dv, min(bv, dv), min(cfg.state_block_v, dv))

  @property
  def grid(self):
    return self.t // self.c, self.b, self.h

  @property
  def state_grid(self):
    return self.dv // self.state_bv, self.b, self.h

  def rows(self, d):
    return pl.BlockSpec((None, self.c, None, d), lambda n, b, h: (b, n, h, 0))

  def gate(self):
    return pl.BlockSpec((None, None, self.c), lambda n, b, h: (b, h, n))

  def state(self):
    return pl.BlockSpec((None, None, None, self.dk, self.dv), lambda n, b, h: (b, h, n, 0, 0))

  def seq_rows(self, d):
    return pl.BlockSpec((None, self.t, None, d), lambda j, b, h: (b, 0, h, 0))

  def seq_rows_v(self):
    return pl.BlockSpec((None, self.t, None, self.state_bv), lambda j, b, h: (b, 0, h, j))

  def seq_gate(self):
    return pl.BlockSpec((None, None, self.t), lambda j, b, h: (b, h, 0))

  def seq_states(self):
    shape = (None, None, self.t // self.c, self.dk, self.state_bv)
    return pl.BlockSpec(shape, lambda j, b, h: (b, h, 0, 0, j))

  def seq_state(self):
    return pl.BlockSpec((None, None, self.dk, self.state_bv), lambda j, b, h: (b, h, 0, j))

  def states_shape(self, dtype):
    return jax.ShapeDtypeStruct((self.b, self.h, self.t // self.c, self.dk, self.dv), dtype)


def _like(x, d=None):
  return jax.ShapeDtypeStruct(x.shape if d is None else (*x.shape[:-1], d), x.dtype)


def _intra(k, v, g, beta, cfg: Config):
  """(M `[B, Tp, H, C]`, W `[B, Tp, H, Dk]`, U' `[B, Tp, H, Dv]`)."""
  lay = _Layout.of(k, v, cfg)
  kernel = functools.partial(_intra_kernel, bs=cfg.sub_block, md=k.dtype, bv=lay.bv,
                             compiled=not cfg.interpret)
  return _call(kernel, cfg, lay.grid, [lay.rows(lay.dk), lay.rows(lay.dv), lay.gate(), lay.gate()],
               [lay.rows(lay.c), lay.rows(lay.dk), lay.rows(lay.dv)],
               [_like(k, lay.c), _like(k), _like(v)], "gated_delta_intra",
               warps=cfg.intra_warps)(k, v, g, beta)


def _states(k, w, u_free, g, s0, cfg: Config):
  """(h `[B, H, N, Dk, Dv]` entering each chunk, U `[B, Tp, H, Dv]`, final state fp32)."""
  lay = _Layout.of(k, u_free, cfg)
  kernel = functools.partial(_state_kernel, md=k.dtype)
  return _call(kernel, cfg, lay.state_grid,
               [lay.seq_rows(lay.dk), lay.seq_rows(lay.dk), lay.seq_rows_v(), lay.seq_gate(),
                lay.seq_state()],
               [lay.seq_states(), lay.seq_rows_v(), lay.seq_state()],
               [lay.states_shape(k.dtype), _like(u_free), _like(s0)], "gated_delta_states",
               warps=cfg.state_warps, stages=cfg.state_stages)(k, w, u_free, g, s0)


def _output(q, k, u, g, h, cfg: Config):
  lay = _Layout.of(q, u, cfg)
  kernel = functools.partial(_output_kernel, scale=cfg.scale, md=q.dtype, bv=lay.bv)
  return _call(kernel, cfg, lay.grid,
               [lay.rows(lay.dk), lay.rows(lay.dk), lay.rows(lay.dv), lay.gate(), lay.state()],
               lay.rows(lay.dv), _like(u), "gated_delta_output", warps=cfg.warps)(q, k, u, g, h)


def _forward(q, k, v, g, beta, s0, cfg: Config):
  m, w, u_free = _intra(k, v, g, beta, cfg)
  h, u, final = _states(k, w, u_free, g, s0, cfg)
  return _output(q, k, u, g, h, cfg), final, (m, w, u_free)


def _backward(cfg: Config, residuals, cotangents):
  q, k, v, g, beta, s0, m, w, u_free = residuals
  do, ds_final = cotangents
  md, lay = q.dtype, _Layout.of(q, v, cfg)
  do = do.astype(md)
  h, u, _ = _states(k, w, u_free, g, s0, cfg)
  rows_k, rows_v, gate = lay.rows(lay.dk), lay.rows(lay.dv), lay.gate()

  kernel = functools.partial(_dv_local_kernel, scale=cfg.scale, md=md, bv=lay.bv)
  du_local = _call(kernel, cfg, lay.grid, [rows_k, rows_k, gate, rows_v], rows_v, _like(v),
                   "gated_delta_dv_local", warps=cfg.warps)(q, k, g, do)

  kernel = functools.partial(_reverse_state_kernel, scale=cfg.scale, md=md)
  seq_k, seq_v = lay.seq_rows(lay.dk), lay.seq_rows_v()
  dh, du, ds0 = _call(
      kernel, cfg, lay.state_grid,
      [seq_k, seq_k, seq_k, lay.seq_gate(), seq_v, seq_v, lay.seq_state()],
      [lay.seq_states(), seq_v, lay.seq_state()], [_like(h), _like(v), _like(s0)],
      "gated_delta_reverse_states", warps=cfg.state_warps, stages=cfg.state_stages)(
          q, k, w, g, do, du_local, ds_final.astype(f32))

  kernel = functools.partial(_dqkwg_kernel, scale=cfg.scale, md=md, bv=lay.bv)
  dq, dk_part, dw, dg_part = _call(
      kernel, cfg, lay.grid,
      [rows_k, rows_k, rows_v, gate, lay.state(), lay.state(), rows_v, rows_v],
      [rows_k, rows_k, rows_k, gate], [_like(q), _like(k), _like(k), _like(g)],
      "gated_delta_dqkwg", warps=cfg.bwd_warps)(q, k, u, g, h, dh, do, du)

  kernel = functools.partial(_wy_bwd_kernel, md=md, bv=lay.bv)
  dk, dv, dbeta, dg = _call(
      kernel, cfg, lay.grid,
      [rows_k, rows_v, gate, gate, lay.rows(lay.c), rows_k, rows_v, rows_k, gate],
      [rows_k, rows_v, gate, gate], [_like(k), _like(v), _like(beta), _like(g)],
      "gated_delta_wy_bwd", warps=cfg.bwd_warps)(k, v, g, beta, m, dw, du, dk_part, dg_part)
  return dq, dk, dv, dg, dbeta, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gated_delta_core(q, k, v, g, beta, s0, cfg: Config):
  """Padded core: q, k `[B, Tp, H, Dk]`, v `[B, Tp, H, Dv]` in one dtype, g (chunk-local
  cumsum) and beta `[B, H, Tp]` fp32, s0 `[B, H, Dk, Dv]` fp32 → (o, final state)."""
  o, final, _ = _forward(q, k, v, g, beta, s0, cfg)
  return o, final


def _core_fwd(q, k, v, g, beta, s0, cfg: Config):
  o, final, wy = _forward(q, k, v, g, beta, s0, cfg)
  return (o, final), (q, k, v, g, beta, s0, *wy)


_gated_delta_core.defvjp(_core_fwd, _backward)


# ---------------------------------------------------------------------------------------------
# Public entry point


def _fail(message: str):
  raise ValueError(f"gated_delta (pallas_triton): {message}")


def _check(q, k, v, chunk_size: int, interpret: bool):
  if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size & (chunk_size - 1):
    _fail(f"chunk_size must be a power of two, got {chunk_size}")
  if not interpret and chunk_size < _MIN_DIM:
    _fail(f"chunk_size must be >= {_MIN_DIM} on GPU (Triton matrix units), got {chunk_size}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.dtype not in _DTYPES:
      _fail(f"{name} must be float32 or bfloat16, got {x.dtype}")


def _pad_dim(x, size: int):
  """Zero-pads the last axis to `size` (zero key/query/value columns change nothing)."""
  pad = size - x.shape[-1]
  return x if pad == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])


def _to_heads_first(x, chunk_size: int):
  """`[B, T, H]` → `[B, H, Tp]` fp32, T zero-padded to a multiple of the chunk size."""
  return jnp.moveaxis(pad_time(x.astype(f32), chunk_size), 1, 2)


def _chunk_cumsum(g, chunk_size: int):
  """Chunk-local cumulative sum along the last axis of `[B, H, Tp]`."""
  b, h, t = g.shape
  return jnp.cumsum(g.reshape(b, h, t // chunk_size, chunk_size), axis=-1).reshape(b, h, t)


def gated_delta(q, k, v, g, beta, *, scale: float, chunk_size: int, initial_state=None,
                interpret: bool | None = None, **tuning):
  """Pallas/Triton gated delta rule with the signature of `gated_delta_chunked`.

  q, k `[B, T, H, Dk]` and v `[B, T, H, Dv]` (float32 or bfloat16), g, beta `[B, T, H]`,
  initial_state `[B, H, Dk, Dv]` or None. Returns (o `[B, T, H, Dv]` in v's dtype, final state
  `[B, H, Dk, Dv]` fp32). Differentiable in every input (custom VJP made of Pallas kernels).
  `interpret`: None runs compiled on a GPU and interpreted elsewhere. `tuning`: `Config` fields
  (block sizes, warps).
  """
  interpret = triton_interpret(interpret)
  _check(q, k, v, chunk_size, interpret)
  b, t, h, dk = q.shape
  dv, out_dtype = v.shape[-1], v.dtype
  md = jnp.result_type(q.dtype, k.dtype, v.dtype)
  dk_pad, dv_pad = (max(_MIN_DIM, next_power_of_2(d)) for d in (dk, dv))
  q, k = (_pad_dim(pad_time(x.astype(md), chunk_size), dk_pad) for x in (q, k))
  v = _pad_dim(pad_time(v.astype(md), chunk_size), dv_pad)
  g = _chunk_cumsum(_to_heads_first(g, chunk_size), chunk_size)
  beta = _to_heads_first(beta, chunk_size)
  s0 = (jnp.zeros((b, h, dk_pad, dv_pad), f32) if initial_state is None
        else _pad_dim(jnp.pad(initial_state.astype(f32),
                              [(0, 0), (0, 0), (0, dk_pad - dk), (0, 0)]), dv_pad))
  cfg = Config(float(scale), chunk_size, interpret, **tuning)
  o, final = _gated_delta_core(q, k, v, g, beta, s0, cfg)
  return o[:, :t, :, :dv].astype(out_dtype), final[:, :, :dk, :dv]

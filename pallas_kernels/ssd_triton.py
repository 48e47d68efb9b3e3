"""SSD / scalar-gated linear attention (Mamba-2, fla `chunk_simple_gla`) as Triton-lowered Pallas.

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

Shapes: q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]` (log-decay), states `[B, H, K, V]`.
T is zero-padded to N·C (g = 0, k = v = 0: identity steps). In chunk n, `G` is the chunk-local
cumulative log-decay (an XLA cumsum, stored `[B, H, T]` so a chunk's decays are contiguous),
`G_last = G_{C-1}`, `P[i, s] = scale · exp(G_i − G_s)` for s <= i (else 0), h_n the state
entering chunk n and D_n the cotangent of the state leaving it. Kernels (fla's decomposition,
plus a one-sweep forward):

  forward sweep  grid (V/BV, B, H): a `fori_loop` over the chunks carrying the `[K, BV]` fp32
                 state in registers and writing each chunk's output,
                     O = (Q Kᵀ ⊙ P) V + scale · exp(G) ⊙ (Q h_n),
                     h_{n+1} = exp(G_last) h_n + (exp(G_last − G) ⊙ K)ᵀ V.
                 Used when B·H·V/BV fills the GPU (>= 128 programs): no state touches HBM.
  state pass     grid (K/BK, V/BV, B, H): the same recurrence (K and V rows are independent in
                 SSD, so the state splits into blocks) writing every h_n (`[B, H, N, K, V]`, in
                 the inputs' dtype: bf16 halves the bytes, and the dots take bf16 operands
                 anyway) and the last state. Reverse mode sweeps the chunks backwards,
                     D_{n-1} = exp(G_last) D_n + (scale · exp(G) ⊙ Q)ᵀ dO,  D_{N-1} = dS_T,
                 its last carry being dS_0; it also reads the h_n and writes ⟨D_n, h_n⟩ (for dg).
  output pass    grid (V/BV, N, B, H), fully parallel: O from h_n as above. With the state pass,
                 the forward for few heads (N·B·H programs instead of B·H).
  grad pass      grid (N, B, H), fully parallel:
                     dV = (Q Kᵀ ⊙ P)ᵀ dO + exp(G_last − G) ⊙ (K D_n)
                     dK = (dO Vᵀ ⊙ P)ᵀ Q + exp(G_last − G) ⊙ (V D_nᵀ)
                     dQ = (dO Vᵀ ⊙ P) K  + scale · exp(G) ⊙ (dO h_nᵀ)
                     dg_t = Σ_{t' >= t in chunk} (q·dq − k·dk)_{t'} + ⟨D_n, h_{n+1}⟩.
  dg             A uniform shift of the global log-decay G_{t'} for all t' >= t moves queries
                 and keys oppositely, so ∂L/∂g_t = Σ_{t' >= t} (q·dq − k·dk)_{t'} over the whole
                 sequence. The part after chunk n scales the state leaving it: it is
                 ⟨D_n, h_{n+1}⟩ = exp(G_last) ⟨D_n, h_n⟩ + Σ_s k_s·dk_s(inter), the first term from
                 the reverse state pass (fp32 D_n), the second from the grad pass. Summing only
                 inside a chunk keeps bf16 rounding from piling up over T (fla does the same).
  The backward is: state pass (recomputing h_n, as fla does), reverse state pass, grad pass.

Cost per (batch, head), e = bytes per element of the inputs and of stored states, N = T/C:
  forward sweep  FLOPs 2·T·(C·K·V/BV + C·V + 2·K·V); bytes T·(2K·V/BV + 2V)·e (q, k re-read per
                 V block, mostly from L2: one head's blocks run side by side).
  state pass     FLOPs 2·T·K·V;  bytes T·(K + V)·e read, N·K·V·e written (reverse: + N·K·V·e
                 read).
  output pass    FLOPs 2·T·(C·K + C·V + K·V);  bytes T·(2K + V)·e + N·K·V·e read, T·V·e written.
  grad pass      FLOPs 2·T·(3·C·K + 2·C·V + 3·K·V);  bytes T·(2K + 2V)·e + 2·N·K·V·e read,
                 T·(2K + V)·e + 4·T written.
At B=8, T=4096, H=16, K=V=128, C=64, bf16 (a q-sized tensor is 134 MB; all h_n are 268 MB):
  forward sweep  0.54 GB (+ L2 re-reads of q, k), 60 GFLOP;
  backward       0.54 + 0.80 GB and 9 + 9 GFLOP (state passes) + 1.61 GB and 94 GFLOP (grads):
                 2.95 GB, a bandwidth floor of 0.9 ms at 3.35 TB/s.
Measured on an H100 (JAX 0.11.2, these shapes, wall clock over 20 calls): forward 0.27 ms (the
sweep 0.26; the two-pass forward 0.52: state pass 0.22 + output pass 0.30), forward + backward
1.77 ms (state pass 0.22, reverse state pass 0.33, grad pass 0.93), against fla
`chunk_simple_gla`'s 0.50 and 3.02 ms. The grad pass runs at about half its bandwidth floor.

Kernels take bf16/fp16/fp32 inputs (fp32: IEEE dots, for tight tests; fp16 states can overflow,
as in fla); fp64 runs in interpret mode only. Compiled, C and the head dims must be powers of two
in [16, 256]; interpret mode (used off GPU) takes any sizes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dlax_kernels.common import pad_time, triton_interpret

_SQ = pl.squeezed
_COMPILED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MIN_DIM, _MAX_DIM = 16, 256
_SWEEP_MIN_PROGRAMS = 128   # about one program per H100 SM (132)
_SHARED_MEMORY_BUDGET = 200 * 1024   # of the H100's 227 KB per program, leaving Triton scratch


class _Launch(NamedTuple):
  """One kernel's tiling and Triton launch parameters."""
  block_k: int
  block_v: int
  num_warps: int
  num_stages: int


class _Config(NamedTuple):
  """Static configuration of one call: chunk size C, mode, path and each kernel's launch."""
  chunk: int
  interpret: bool
  sweep: bool                # forward: one sweep per head (no states in HBM), else two passes
  state: _Launch
  output: _Launch
  grad: _Launch
  forward_sweep: _Launch


def _block(dim: int, cap: int) -> int:
  """`cap` when it tiles `dim`, else the whole dim (small or odd dims in interpret mode)."""
  return cap if dim > cap and dim % cap == 0 else dim


def _grad_shared_memory(chunk: int, k_dim: int, block_v: int, itemsize: int) -> int:
  """Bytes of the grad pass's dot operands: q, k, Q Kᵀ, dO Vᵀ and one block of v, dO, h_n, D_n
  (this matched Triton's request, 288 KB, at fp32, C = 64, K = V = BV = 128)."""
  return itemsize * (2 * chunk * k_dim + 2 * chunk * chunk + 2 * (chunk + k_dim) * block_v)


def _grad_block_v(chunk: int, k_dim: int, v_dim: int, itemsize: int) -> int:
  """The largest V block (V halved while even and above 16) whose operands fit the budget."""
  block_v = v_dim
  while (block_v > _MIN_DIM and block_v % 2 == 0
         and _grad_shared_memory(chunk, k_dim, block_v, itemsize) > _SHARED_MEMORY_BUDGET):
    block_v //= 2
  return block_v


def _config(batch: int, heads: int, k_dim: int, v_dim: int, itemsize: int, chunk: int,
            interpret: bool) -> _Config:
  """Heuristic path and tiles, from timings on an H100 (K = V = 128, C = 64, bf16).

  The forward sweep runs B·H·V/BV programs: at 256 it took half the time of the two passes, at
  64 the same, at 16 1.6× longer; hence the threshold. Two-pass tiles: 64×128 state blocks,
  output blocks of up to 128 values with 4 warps (8 warps: 35% slower). Grad pass: V in the
  fewest blocks that fit shared memory (bf16 at K = V = 128: one; fp32: blocks of 64).
  """
  warps = lambda rows, cols: 8 if rows * cols >= 128 * 128 else 4
  forward_bv = _block(v_dim, 64)
  return _Config(
      chunk, interpret,
      sweep=batch * heads * (v_dim // forward_bv) >= _SWEEP_MIN_PROGRAMS,
      state=_Launch(_block(k_dim, 64), _block(v_dim, 128), num_warps=4, num_stages=2),
      output=_Launch(k_dim, _block(v_dim, 128), num_warps=4, num_stages=2),
      grad=_Launch(k_dim, _grad_block_v(chunk, k_dim, v_dim, itemsize),
                   num_warps=warps(k_dim, v_dim), num_stages=1),
      forward_sweep=_Launch(k_dim, forward_bv, num_warps=4, num_stages=2))


def _params(cfg: _Config, launch: _Launch):
  if cfg.interpret:
    return None
  return plt.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def _is_power_of_2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _check(q, v, chunk_size: int, interpret: bool) -> None:
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"ssd (pallas_triton): chunk_size must be a positive int, got {chunk_size!r}")
  if interpret:
    return
  if not (_is_power_of_2(chunk_size) and _MIN_DIM <= chunk_size <= _MAX_DIM):
    raise ValueError(f"ssd (pallas_triton): chunk_size must be a power of two in [{_MIN_DIM}, "
                     f"{_MAX_DIM}] on GPU, got {chunk_size}")
  for name, dim in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
    if not (_is_power_of_2(dim) and _MIN_DIM <= dim <= _MAX_DIM):
      raise ValueError(f"ssd (pallas_triton): head dim {name} must be a power of two in "
                       f"[{_MIN_DIM}, {_MAX_DIM}] on GPU, got {dim}")
  dtype = jnp.result_type(q, v)
  if dtype not in _COMPILED_DTYPES:
    raise ValueError(f"ssd (pallas_triton): inputs must be bfloat16, float16 or float32 on GPU, "
                     f"got {dtype}")
  itemsize, k_dim = jnp.dtype(dtype).itemsize, q.shape[-1]
  block_v = _grad_block_v(chunk_size, k_dim, v.shape[-1], itemsize)
  if _grad_shared_memory(chunk_size, k_dim, block_v, itemsize) > _SHARED_MEMORY_BUDGET:
    raise ValueError(f"ssd (pallas_triton): chunk_size {chunk_size} with Dk={k_dim} in {dtype} "
                     "needs more GPU shared memory than a program has; use a smaller chunk_size "
                     "or bfloat16 inputs")


# ---------------------------------------------------------------------------------------------
# Per-chunk math shared by the kernels. `acc` is fp32 (fp64 for fp64 inputs in interpret mode);
# dot operands are cast to the inputs' dtype, as fla does.


def _dot(a, b, *, contract=(1, 0), acc=jnp.float32):
  """`a @ b` contracting a's axis `contract[0]` with b's `contract[1]`, accumulating in `acc`.
  HIGHEST: IEEE fp32 products for fp32 operands (Triton and interpret mode alike, never TF32)."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def _decays(g_ref, start, chunk: int, acc):
  """A chunk's local cumulative log-decays G `[C]` and G_last (`start` None: the whole block)."""
  if start is None:
    return g_ref[...].astype(acc), g_ref[chunk - 1].astype(acc)
  return g_ref[pl.ds(start, chunk)].astype(acc), g_ref[start + chunk - 1].astype(acc)


def _causal_decay(gc, scale: float):
  """`P[i, s] = scale · exp(G_i − G_s)` for s <= i, else 0 (exp(−inf) = 0: no overflow)."""
  c = gc.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return scale * jnp.exp(jnp.where(rows >= cols, gc[:, None] - gc[None, :], -jnp.inf))


def _masked_scores(a, b, decay, acc):
  """`(A Bᵀ) ⊙ P` in the operands' dtype, ready to be a dot operand."""
  return (_dot(a, b, contract=(1, 1), acc=acc) * decay).astype(a.dtype)


def _carry(state, left, weight, right, g_last, acc):
  """`exp(G_last) · state + (weight ⊙ left)ᵀ right`: the state (or its cotangent) across a chunk."""
  left = (left.astype(acc) * weight[:, None]).astype(right.dtype)
  return jnp.exp(g_last) * state + _dot(left, right, contract=(0, 0), acc=acc)


def _chunk_output(q, k, v, gc, state, scale: float, acc):
  """`O = (Q Kᵀ ⊙ P) V + scale · exp(G) ⊙ (Q h)` (h: the state entering the chunk)."""
  scores = _masked_scores(q, k, _causal_decay(gc, scale), acc)
  inter = _dot(q, state.astype(q.dtype), acc=acc) * (scale * jnp.exp(gc))[:, None]
  return inter + _dot(scores, v, acc=acc)


def _row_dot(a, b, acc):
  """Per-token `Σ_D a ⊙ b` `[C]`."""
  return jnp.sum(a.astype(acc) * b, axis=1)


def _reverse_cumsum(x):
  """`out_i = Σ_{j >= i} x_j` over a chunk, as a masked row sum."""
  c = x.shape[0]
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  return jnp.sum(jnp.where(cols >= rows, x[None, :], 0), axis=1)


def _sweep(num_chunks: int, step, init, *, reverse: bool = False):
  """`fori_loop` over the chunks (last to first when `reverse`); `step(n, carry) -> carry`."""
  body = (lambda i, carry: step(num_chunks - 1 - i, carry)) if reverse else step
  return lax.fori_loop(jnp.int32(0), jnp.int32(num_chunks), body, init)


# ---------------------------------------------------------------------------------------------
# Chunk-parallel path: state pass (forward and reverse), output pass, grad pass.


def _state_pass_kernel(left_ref, right_ref, g_ref, s0_ref, *refs, chunk: int, reverse: bool,
                       scale: float):
  """Carries one `[BK, BV]` block of the state (forward: left = k, right = v) or of its cotangent
  (reverse: left = q, right = dO) over the chunks: left `[T, BK]`, right `[T, BV]`, g `[T]`,
  s0 `[BK, BV]`; writes the carry entering each chunk, states `[N, BK, BV]`, and the last one.

  Reverse mode also takes the forward states h `[N, BK, BV]` and writes this block's part of
  ⟨D_n, h_n⟩ `[N]` (fp32 D_n, for dg)."""
  if reverse:
    h_ref, states_ref, last_ref, pairing_ref = refs
  else:
    states_ref, last_ref = refs
  acc = last_ref.dtype

  def step(n, state):
    start = pl.multiple_of(n * chunk, chunk)
    states_ref[n] = state.astype(states_ref.dtype)
    gc, g_last = _decays(g_ref, start, chunk, acc)
    if reverse:
      pairing_ref[n] = jnp.sum(jnp.sum(state * h_ref[n].astype(acc), axis=1))
    weight = scale * jnp.exp(gc) if reverse else jnp.exp(g_last - gc)
    rows = pl.ds(start, chunk)
    return _carry(state, left_ref[rows, :], weight, right_ref[rows, :], g_last, acc)

  last_ref[...] = _sweep(states_ref.shape[0], step, s0_ref[...].astype(acc), reverse=reverse)


def _output_kernel(q_ref, k_ref, v_ref, g_ref, h_ref, o_ref, *, scale: float):
  """One chunk, one V block: q, k `[C, K]`, v `[C, BV]`, g `[C]`, h `[K, BV]` -> o `[C, BV]`."""
  acc = jnp.promote_types(jnp.float32, q_ref.dtype)
  gc = g_ref[...].astype(acc)
  o = _chunk_output(q_ref[...], k_ref[...], v_ref[...], gc, h_ref[...], scale, acc)
  o_ref[...] = o.astype(o_ref.dtype)


def _grad_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, h_ref, dh_ref,
                 dq_ref, dk_ref, dv_ref, dg_ref, *, scale: float, block_v: int):
  """One chunk: q, k `[C, K]`, v, dO `[C, V]`, g `[C]`, h_n, D_n `[K, V]` -> dQ, dK, dV and dg
  `[C]` but for its term exp(G_last) ⟨D_n, h_n⟩ (module docstring; added in XLA).

  V in blocks of `block_v`, the fewest that fit shared memory; with one block, v and dO are
  loaded once."""
  acc = jnp.promote_types(jnp.float32, q_ref.dtype)
  q, k = q_ref[...], k_ref[...]
  gc, g_last = _decays(g_ref, None, q.shape[0], acc)
  decay = _causal_decay(gc, scale)
  to_end, from_start = jnp.exp(g_last - gc)[:, None], (scale * jnp.exp(gc))[:, None]
  scores = _masked_scores(q, k, decay, acc)
  cols = [pl.ds(start, block_v) for start in range(0, v_ref.shape[1], block_v)]

  def values(c):
    return v_ref[:, c], do_ref[:, c]

  v, do = values(cols[0])   # kept when V is one block
  dscores = _dot(do, v, contract=(1, 1), acc=acc)
  for c in cols[1:]:
    v_c, do_c = values(c)
    dscores += _dot(do_c, v_c, contract=(1, 1), acc=acc)
  dscores = (dscores * decay).astype(q.dtype)
  dq, dk_inter = jnp.zeros(q.shape, acc), jnp.zeros(q.shape, acc)
  for c in cols:
    v, do = (v, do) if len(cols) == 1 else values(c)
    dh = dh_ref[:, c]
    dv = _dot(scores, do, contract=(0, 0), acc=acc) + to_end * _dot(k, dh, acc=acc)
    dv_ref[:, c] = dv.astype(dv_ref.dtype)
    dk_inter += to_end * _dot(v, dh, contract=(1, 1), acc=acc)
    dq += from_start * _dot(do, h_ref[:, c], contract=(1, 1), acc=acc)
  dq += _dot(dscores, k, acc=acc)
  dk = _dot(dscores, q, contract=(0, 0), acc=acc) + dk_inter
  leaving = jnp.sum(_row_dot(k, dk_inter, acc))   # ⟨D_n, h_{n+1} − exp(G_last) h_n⟩
  dg_ref[...] = _reverse_cumsum(_row_dot(q, dq, acc) - _row_dot(k, dk, acc)) + leaving
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Forward sweep: one program per (batch, head, V block) sweeping the chunks with its state in
# registers; nothing but the inputs and outputs goes through HBM.


def _forward_sweep_kernel(q_ref, k_ref, v_ref, g_ref, s0_ref, o_ref, last_ref, *, chunk: int,
                          scale: float):
  """q, k `[T, K]`, v `[T, BV]`, g `[T]`, s0 `[K, BV]` -> o `[T, BV]`, last state `[K, BV]`."""
  acc = last_ref.dtype

  def step(n, state):
    start = pl.multiple_of(n * chunk, chunk)
    rows = pl.ds(start, chunk)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
    gc, g_last = _decays(g_ref, start, chunk, acc)
    o_ref[rows, :] = _chunk_output(q, k, v, gc, state, scale, acc).astype(o_ref.dtype)
    return _carry(state, k, jnp.exp(g_last - gc), v, g_last, acc)

  last_ref[...] = _sweep(q_ref.shape[0] // chunk, step, s0_ref[...].astype(acc))


# ---------------------------------------------------------------------------------------------
# pallas_calls. Sequence tensors stay `[B, T, H, D]`; decays are `[B, H, T]`; states
# `[B, H, (N,) K, V]`. Grids put the batch and head axes last (one head's blocks run together).


def _call(kernel, cfg: _Config, launch: _Launch, name: str, grid, in_specs, out_specs, out_shape,
          *args, **params):
  return pl.pallas_call(
      functools.partial(kernel, **params), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=cfg.interpret, compiler_params=_params(cfg, launch),
      name=name)(*args)


def _shape(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _state_pass(left, right, gc, s0, cfg: _Config, *, h=None, scale: float = 1.0):
  """All chunks' carries `[B, H, N, K, V]` (right's dtype) and the last carry (s0's dtype).
  Given the forward states h, runs in reverse (the cotangents) and also returns ⟨D_n, h_n⟩
  `[B, H, N]`."""
  b, t, h_dim, k_dim = left.shape
  v_dim = right.shape[-1]
  bk, bv = cfg.state.block_k, cfg.state.block_v
  n, reverse = t // cfg.chunk, h is not None
  states = pl.BlockSpec((_SQ, _SQ, n, bk, bv), lambda ik, iv, ib, ih: (ib, ih, 0, ik, iv))
  block = pl.BlockSpec((_SQ, _SQ, bk, bv), lambda ik, iv, ib, ih: (ib, ih, ik, iv))
  in_specs = [pl.BlockSpec((_SQ, t, _SQ, bk), lambda ik, iv, ib, ih: (ib, 0, ih, ik)),
              pl.BlockSpec((_SQ, t, _SQ, bv), lambda ik, iv, ib, ih: (ib, 0, ih, iv)),
              pl.BlockSpec((_SQ, _SQ, t), lambda ik, iv, ib, ih: (ib, ih, 0)), block]
  out_specs = [states, block]
  out_shape = [jax.ShapeDtypeStruct((b, h_dim, n, k_dim, v_dim), right.dtype), _shape(s0)]
  args = [left, right, gc, s0]
  if reverse:   # one ⟨D_n, h_n⟩ partial sum per state block, added up below
    blocks = (k_dim // bk) * (v_dim // bv)
    in_specs.append(states)
    out_specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, n),
                                  lambda ik, iv, ib, ih: (ib, ih, ik * (v_dim // bv) + iv, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h_dim, blocks, n), s0.dtype))
    args.append(h)
  outs = _call(_state_pass_kernel, cfg, cfg.state, "ssd_state_pass" + "_reverse" * reverse,
               (k_dim // bk, v_dim // bv, b, h_dim), in_specs, out_specs, out_shape, *args,
               chunk=cfg.chunk, reverse=reverse, scale=scale)
  return (*outs[:2], jnp.sum(outs[2], axis=2)) if reverse else tuple(outs)


def _output_pass(q, k, v, gc, states, cfg: _Config, scale: float):
  b, t, h, k_dim = q.shape
  c, bv = cfg.chunk, cfg.output.block_v
  keys = pl.BlockSpec((_SQ, c, _SQ, k_dim), lambda iv, n, ib, ih: (ib, n, ih, 0))
  values = pl.BlockSpec((_SQ, c, _SQ, bv), lambda iv, n, ib, ih: (ib, n, ih, iv))
  return _call(
      _output_kernel, cfg, cfg.output, "ssd_output_pass", (v.shape[-1] // bv, t // c, b, h),
      [keys, keys, values, pl.BlockSpec((_SQ, _SQ, c), lambda iv, n, ib, ih: (ib, ih, n)),
       pl.BlockSpec((_SQ, _SQ, _SQ, k_dim, bv), lambda iv, n, ib, ih: (ib, ih, n, 0, iv))],
      values, _shape(v), q, k, v, gc, states, scale=scale)


def _grad_pass(q, k, v, do, gc, states, dstates, cfg: _Config, scale: float):
  """dq, dk, dv (inputs' dtype) and dg `[B, H, T]` (fp32)."""
  b, t, h, k_dim = q.shape
  v_dim = v.shape[-1]
  c = cfg.chunk
  seq = lambda d: pl.BlockSpec((_SQ, c, _SQ, d), lambda n, ib, ih: (ib, n, ih, 0))
  per_chunk = pl.BlockSpec((_SQ, _SQ, c), lambda n, ib, ih: (ib, ih, n))
  state = pl.BlockSpec((_SQ, _SQ, _SQ, k_dim, v_dim), lambda n, ib, ih: (ib, ih, n, 0, 0))
  return _call(
      _grad_kernel, cfg, cfg.grad, "ssd_grad_pass", (t // c, b, h),
      [seq(k_dim), seq(k_dim), seq(v_dim), seq(v_dim), per_chunk, state, state],
      [seq(k_dim), seq(k_dim), seq(v_dim), per_chunk],
      [_shape(q), _shape(k), _shape(v), _shape(gc)],
      q, k, v, do, gc, states, dstates, scale=scale, block_v=cfg.grad.block_v)


def _forward_sweep(q, k, v, gc, s0, cfg: _Config, scale: float):
  b, t, h, k_dim = q.shape
  bv = cfg.forward_sweep.block_v
  keys = pl.BlockSpec((_SQ, t, _SQ, k_dim), lambda iv, ib, ih: (ib, 0, ih, 0))
  values = pl.BlockSpec((_SQ, t, _SQ, bv), lambda iv, ib, ih: (ib, 0, ih, iv))
  state = pl.BlockSpec((_SQ, _SQ, k_dim, bv), lambda iv, ib, ih: (ib, ih, 0, iv))
  return _call(
      _forward_sweep_kernel, cfg, cfg.forward_sweep, "ssd_forward_sweep",
      (v.shape[-1] // bv, b, h),
      [keys, keys, values, pl.BlockSpec((_SQ, _SQ, t), lambda iv, ib, ih: (ib, ih, 0)), state],
      [values, state], [_shape(v), _shape(s0)],
      q, k, v, gc, s0, chunk=cfg.chunk, scale=scale)


# ---------------------------------------------------------------------------------------------
# custom_vjp


def _chunk_cumsum(g, chunk: int):
  """`[B, T, H]` log-decays (T a multiple of C) -> chunk-local cumsums `[B, H, T]`."""
  b, t, h = g.shape
  g = jnp.swapaxes(g, 1, 2).reshape(b, h, t // chunk, chunk)
  return jnp.cumsum(g, axis=-1).reshape(b, h, t)


def _add_per_chunk(x, per_chunk):
  """`x [B, H, N·C] + per_chunk [B, H, N]`, each chunk's value added to its C tokens."""
  b, h, n = per_chunk.shape
  return (x.reshape(b, h, n, -1) + per_chunk[..., None]).reshape(x.shape)


def _forward(q, k, v, gc, s0, scale: float, cfg: _Config):
  if cfg.sweep:
    return _forward_sweep(q, k, v, gc, s0, cfg, scale)
  states, final = _state_pass(k, v, gc, s0, cfg)
  return _output_pass(q, k, v, gc, states, cfg, scale), final


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ssd(q, k, v, g, s0, scale: float, cfg: _Config):
  """q, k, v `[B, T, H, D]` and g `[B, T, H]` with T a multiple of C."""
  return _forward(q, k, v, _chunk_cumsum(g, cfg.chunk), s0, scale, cfg)


def _ssd_fwd(q, k, v, g, s0, scale, cfg):
  gc = _chunk_cumsum(g, cfg.chunk)
  o, final = _forward(q, k, v, gc, s0, scale, cfg)
  return (o, final), (q, k, v, gc, s0)


def _ssd_bwd(scale, cfg, residuals, cotangents):
  q, k, v, gc, s0 = residuals
  do, dfinal = cotangents
  do, dfinal = do.astype(v.dtype), dfinal.astype(s0.dtype)
  states, _ = _state_pass(k, v, gc, s0, cfg)
  dstates, ds0, pairing = _state_pass(q, do, gc, dfinal, cfg, h=states, scale=scale)
  dq, dk, dv, dg = _grad_pass(q, k, v, do, gc, states, dstates, cfg, scale)
  dg = _add_per_chunk(dg, jnp.exp(gc[..., cfg.chunk - 1::cfg.chunk]) * pairing)
  return dq, dk, dv, jnp.swapaxes(dg, 1, 2).astype(gc.dtype), ds0


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd(q, k, v, g, *, scale: float, chunk_size: int, initial_state=None,
        interpret: bool | None = None):
  """Returns (o `[B, T, H, V]` in v's dtype, final state `[B, H, K, V]` in fp32 (fp64 for fp64
  inputs)); `ssd_chunked`'s signature, differentiable in q, k, v, g and initial_state.

  `interpret`: None runs compiled on a GPU and interpreted elsewhere (`triton_interpret`).
  """
  interpret = triton_interpret(interpret)
  _check(q, v, chunk_size, interpret)
  b, t, h, k_dim = q.shape
  v_dim = v.shape[-1]
  dtype = jnp.result_type(q, k, v)
  acc = jnp.result_type(jnp.float32, dtype, g, *([] if initial_state is None else [initial_state]))
  cfg = _config(b, h, k_dim, v_dim, jnp.dtype(dtype).itemsize, chunk_size, interpret)
  s0 = (jnp.zeros((b, h, k_dim, v_dim), acc) if initial_state is None
        else initial_state.astype(acc))
  out_dtype = v.dtype
  q, k, v = (pad_time(x.astype(dtype), chunk_size) for x in (q, k, v))
  o, final = _ssd(q, k, v, pad_time(g.astype(acc), chunk_size), s0, float(scale), cfg)
  return o[:, :t].astype(out_dtype), final

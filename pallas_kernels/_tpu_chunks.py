"""Mosaic (TPU) chunk kernels shared by `ssd_tpu` and `gated_delta_tpu`, forward and backward.

Both ops reduce to one chunk recurrence over "pseudo-values" U: SSD uses U = V, the gated delta
rule U = U' − W S with U' = Ψ V and W = Ψ diag(γ) K from its WY solve (done in XLA by the caller).

Layout (the wrappers move heads before time and zero-pad T to N·C): q, k, w `[B, H, T, Dk]`,
u `[B, H, T, Dv]`, G `[B, H, N, 1, C]` (log-decay cumulated within each chunk, G_i = g_0 + … + g_i,
fp32), states `[B, H, Dk, Dv]` fp32.

Forward (`chunk_attention`): grid (B, H, Dv/bv, N), the chunk axis last and "arbitrary"
(sequential), the others "parallel". Each step brings one chunk — q, k, w `[C, Dk]`, u `[C, bv]`,
G `[1, C]` — into VMEM and advances the state block S `[Dk, bv]` kept in VMEM scratch (loaded from
the initial state at chunk 0 under `pl.when`). With γ_i = exp G_i, e_i = exp(G_{C−1} − G_i),
Γ_is = exp(G_i − G_s) for s <= i (else 0) and P = scale · (Q Kᵀ) ⊙ Γ `[C, C]`:

    U      = u − W S                          (delta rule; SSD: U = u)
    o      = P U + scale · diag(γ) Q S        `[C, bv]`
    S_next = γ_{C−1} S + (diag(e) K)ᵀ U        `[Dk, bv]`

Backward (`custom_vjp`): a forward pass in "states" mode writes the state entering every chunk
(`[B, H, N, Dk, Dv]`; recomputed, not saved by the forward), then one reverse pass over the same
grid whose index maps read chunk N−1−n at step n. It carries dS, the cotangent of the state leaving
the chunk, in VMEM scratch, starting from the final-state cotangent:

    dU  = Pᵀ dO + diag(e) K dS                 dP = scale · (dO Uᵀ) ⊙ Γ
    dQ  = dP K + scale · diag(γ) dO Sᵀ         dK = dPᵀ Q + diag(e) U dSᵀ
    dW  = −dU Sᵀ                               dS ← γ_{C−1} dS + scale · (diag(γ) Q)ᵀ dO − Wᵀ dU
    dG_i = q_i·dQ_i − k_i·dK_i,  plus γ_{C−1} ⟨S, dS⟩ + Σ_s k_s·(diag(e) U dSᵀ)_s at i = C−1

dQ, dK, dW and dG contract over Dv, so each value block writes its partial and XLA sums them; dS
after chunk 0 is d(initial state). dG is the cotangent of the cumulated G: the wrappers build G
with `jnp.cumsum`, so autodiff turns dG into dg (a reverse cumsum), as it does for the layout glue.

Matmuls run on the MXU in the inputs' dtype (bf16 or fp32 at `Precision.HIGHEST`) with fp32
accumulation; decays, states and every elementwise step are fp32.

Block sizes per TPU generation (`BLOCKS`, keyed on `device_kind`): the value tile bv matches the
MXU width — 128 on v4 / v5e / v5p (128×128 MXUs), 256 on v6e / v7 (256×256) when Dv allows. Dk is
never split (Q Kᵀ needs all of it). VMEM holds, double-buffered, the chunk's q, k, w, u, dO blocks,
two `[Dk, bv]` state blocks and the scratch, plus `[C, C]` temporaries: about 2 MiB at C = 64,
Dk = bv = 128 in fp32 and about 9 MiB for the backward at C = Dk = bv = 256, within every
generation's VMEM (16 MiB per core on v4, 128 MiB on v5e / v6e, 64 MiB on v5p / v7); the limit is
raised above Mosaic's default scoped limit where the chip has room.
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

from dlax_kernels.common import pad_time, tpu_interpret

MiB = 1 << 20
LANES = 128                                   # lane width of a vreg: the minor-dim tile
CHUNK_SIZES = (16, 32, 64, 128, 256)          # compiled: whole (16, 128) bf16 sublane tiles
DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tiling for one TPU generation: `block_v` value columns per program (the MXU width) and the
  scoped VMEM limit given to Mosaic (None: the compiler's default)."""
  block_v: int
  vmem_limit_bytes: int | None = None


BLOCKS = {
    "v4": Blocks(128),                  # 128×128 MXUs, 16 MiB VMEM: keep the default limit
    "v5e": Blocks(128, 64 * MiB),       # 128×128 MXUs, 128 MiB VMEM
    "v5p": Blocks(128, 48 * MiB),       # 128×128 MXUs, 64 MiB VMEM
    "v6e": Blocks(256, 64 * MiB),       # 256×256 MXUs, 128 MiB VMEM
    "v7": Blocks(256, 48 * MiB),        # 256×256 MXUs, 64 MiB VMEM per TensorCore
}
DEFAULT_BLOCKS = Blocks(LANES)
_GENERATION_ALIASES = {"v4lite": "v4", "v5lite": "v5e", "v5": "v5p", "v6lite": "v6e", "7": "v7",
                       "7x": "v7", "v7x": "v7"}


def generation(device_kind: str) -> str | None:
  """`BLOCKS` key of a `device_kind` ("TPU v5 lite" -> "v5e", "TPU7x" -> "v7"); None if unknown."""
  name = device_kind.lower().replace("tpu", "").replace(" ", "")
  name = _GENERATION_ALIASES.get(name, name)
  return name if name in BLOCKS else None


def blocks_for(device_kind: str) -> Blocks:
  return BLOCKS.get(generation(device_kind), DEFAULT_BLOCKS)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Static configuration of one call (hashable: the `custom_vjp`'s non-differentiable argument)."""
  op: str
  scale: float
  chunk: int
  block_v: int
  interpret: bool
  dtype: jnp.dtype              # MXU operand dtype: the inputs' common dtype
  head_multiple: int            # head dims are zero-padded to a multiple of this
  vmem_limit_bytes: int | None = None

  def compiler_params(self):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                     "arbitrary"),
                                vmem_limit_bytes=self.vmem_limit_bytes)


def _fail(op: str, message: str):
  raise ValueError(f"{op}: {message}")


def make_setup(op: str, q, k, v, *, scale: float, chunk_size: int, interpret: bool | None,
               block_v: int | None) -> Setup:
  """Validates a kernel call and picks its blocks. Compiled (on a TPU): C in `CHUNK_SIZES`, head
  dims padded to 128 lanes, bv from `BLOCKS`. Interpreted: any C, no padding, bv = Dv by default."""
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  if dtype not in DTYPES:
    _fail(op, f"the TPU kernel takes float32 or bfloat16 q, k, v, got {dtype}")
  interpreted = tpu_interpret(interpret) is not False
  if not interpreted and chunk_size not in CHUNK_SIZES:
    _fail(op, f"the compiled TPU kernel needs chunk_size in {CHUNK_SIZES}, got {chunk_size}")
  head_multiple = 1 if interpreted else LANES
  dv = -v.shape[-1] % head_multiple + v.shape[-1]
  blocks = DEFAULT_BLOCKS if interpreted else blocks_for(jax.devices()[0].device_kind)
  if block_v is None:
    block_v = next((b for b in (blocks.block_v, LANES) if dv % b == 0), dv)
  elif dv % block_v or (not interpreted and block_v % LANES):
    _fail(op, f"block_v={block_v} must divide the value width {dv}"
          + ("" if interpreted else f" and be a multiple of {LANES}"))
  return Setup(op, float(scale), chunk_size, block_v, interpreted, jnp.dtype(dtype),
               head_multiple, blocks.vmem_limit_bytes)


# ----------------------------------------------------------------------------- layout glue (XLA)

def heads_major(setup: Setup, x):
  """`[B, T, H, D]` -> `[B, H, T', D']` in the kernel dtype, T' a multiple of C and D' of the
  head tile (zero padding: k = v = 0 steps leave the state unchanged)."""
  x = pad_time(pad_time(x.astype(setup.dtype), setup.chunk), setup.head_multiple, axis=-1)
  return jnp.swapaxes(x, 1, 2)


def time_major(x, t: int, d: int):
  """Inverse of `heads_major`: `[B, H, T', D']` -> `[B, T, H, D]`."""
  return jnp.swapaxes(x, 1, 2)[:, :t, :, :d]


def chunked_gates(setup: Setup, x):
  """`[B, T, H]` -> `[B, H, N, 1, C]` fp32 (zero-padded): per-token gates (g, beta) by chunk."""
  x = jnp.swapaxes(pad_time(x.astype(jnp.float32), setup.chunk), 1, 2)
  b, h, t = x.shape
  return x.reshape(b, h, t // setup.chunk, 1, setup.chunk)


def chunk_log_decay(setup: Setup, g):
  """G `[B, H, N, 1, C]`: the log-decay g `[B, T, H]` cumulated within each chunk."""
  return jnp.cumsum(chunked_gates(setup, g), axis=-1)


def padded_state(setup: Setup, state, shape: tuple[int, ...]):
  """The fp32 initial state `[B, H, Dk', Dv']` (zeros for None)."""
  if state is None:
    return jnp.zeros(shape, jnp.float32)
  state = state.astype(jnp.float32)
  for axis in (-2, -1):
    state = pad_time(state, setup.head_multiple, axis=axis)
  return state


# --------------------------------------------------------------------------- in-kernel helpers

_NN = (((1,), (0,)), ((), ()))                # A B
_NT = (((1,), (1,)), ((), ()))                # A Bᵀ
_TN = (((0,), (0,)), ((), ()))                # Aᵀ B


def _dot(a, b, dims, dtype):
  """MXU product of `a` and `b` cast to `dtype`, accumulated in fp32."""
  precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                         preferred_element_type=jnp.float32)


def _iota(shape, axis: int):
  return lax.broadcasted_iota(jnp.int32, shape, axis)


def _eye(c: int):
  return _iota((c, c), 0) == _iota((c, c), 1)


def _row_to_col(x):
  """`[1, C]` -> `[C, 1]` by a masked lane reduction (no relayout of a 1-row vector)."""
  return jnp.sum(jnp.where(_eye(x.shape[1]), x, 0.0), axis=1, keepdims=True)


def _col_to_row(x):
  """`[C, 1]` -> `[1, C]` by a masked sublane reduction."""
  return jnp.sum(jnp.where(_eye(x.shape[0]), x, 0.0), axis=0, keepdims=True)


class _Decays(NamedTuple):
  gamma: jax.Array              # [C, 1]  exp G_i: decay from the chunk start through token i
  to_end: jax.Array             # [C, 1]  exp(G_{C−1} − G_i): decay after token i to the chunk end
  last: jax.Array               # [1, 1]  exp G_{C−1}: decay across the whole chunk
  matrix: jax.Array             # [C, C]  Γ_is = exp(G_i − G_s) for s <= i, else 0


def _last_lane_mask(shape):
  return _iota(shape, 1) == shape[1] - 1


def _decays(g_row) -> _Decays:
  """Decay factors of one chunk from its cumulated log-decay `[1, C]`."""
  c = g_row.shape[1]
  g_col = _row_to_col(g_row)
  g_last = jnp.sum(jnp.where(_last_lane_mask(g_row.shape), g_row, 0.0), axis=1, keepdims=True)
  causal = _iota((c, c), 0) >= _iota((c, c), 1)
  return _Decays(gamma=jnp.exp(g_col), to_end=jnp.exp(g_last - g_col), last=jnp.exp(g_last),
                 matrix=jnp.exp(jnp.where(causal, g_col - g_row, -jnp.inf)))


def _pseudo_values(refs, state, dtype):
  """U = u − W S for the delta rule (`w` given), else u; fp32 `[C, bv]`."""
  u = refs["u"][...].astype(jnp.float32)
  return u - _dot(refs["w"][...], state, _NN, dtype) if "w" in refs else u


def _sum(x):
  return jnp.sum(x, axis=(0, 1), keepdims=True)


# ----------------------------------------------------------------------------------- kernels

def _forward_kernel(*refs, names, scale: float, n_chunks: int):
  """One chunk: reads S from scratch, writes o (and/or S into `states`), advances S."""
  r = dict(zip(names, refs))
  state_scratch = refs[-1]
  step = pl.program_id(3)
  dtype = r["k"].dtype

  @pl.when(step == 0)
  def _():
    state_scratch[...] = r["s0"][...]

  s = state_scratch[...]
  if "states" in r:
    r["states"][...] = s
  d = _decays(r["g"][...])
  k = r["k"][...]
  u = _pseudo_values(r, s, dtype)
  if "o" in r:
    q = r["q"][...]
    p = (scale * _dot(q, k, _NT, dtype)) * d.matrix
    o = _dot(p, u, _NN, dtype) + scale * _dot(q * d.gamma, s, _NN, dtype)
    r["o"][...] = o.astype(r["o"].dtype)
  s_next = d.last * s + _dot(k * d.to_end, u, _TN, dtype)
  state_scratch[...] = s_next
  if "final" in r:
    @pl.when(step == n_chunks - 1)
    def _():
      r["final"][...] = s_next


def _backward_kernel(*refs, names, scale: float, n_chunks: int):
  """One chunk, last chunk first: gradients of the chunk's inputs, then dS <- d(entering state)."""
  r = dict(zip(names, refs))
  ds_scratch = refs[-1]
  step = pl.program_id(3)
  dtype = r["k"].dtype

  @pl.when(step == 0)
  def _():
    ds_scratch[...] = r["dfinal"][...]

  ds = ds_scratch[...]                                          # cotangent of S_next
  s = r["states"][...]                                          # state entering the chunk
  d = _decays(r["g"][...])
  q, k, do = r["q"][...], r["k"][...], r["do"][...]
  u = _pseudo_values(r, s, dtype)
  p = (scale * _dot(q, k, _NT, dtype)) * d.matrix
  du = _dot(p, do, _TN, dtype) + _dot(k * d.to_end, ds, _NN, dtype)
  dp = (scale * _dot(do, u, _NT, dtype)) * d.matrix
  dq = _dot(dp, k, _NN, dtype) + (scale * d.gamma) * _dot(do, s, _NT, dtype)
  dk_end = d.to_end * _dot(u, ds, _NT, dtype)
  dk = _dot(dp, q, _TN, dtype) + dk_end
  dg = _col_to_row(jnp.sum(q * dq - k * dk, axis=1, keepdims=True))
  last = d.last * _sum(s * ds) + _sum(k * dk_end)              # dG_{C−1}: S_next's decays
  r["dg"][...] = dg + jnp.where(_last_lane_mask(dg.shape), last, 0.0)
  ds_prev = d.last * ds + scale * _dot(q * d.gamma, do, _TN, dtype)
  if "w" in r:
    ds_prev = ds_prev - _dot(r["w"][...], du, _TN, dtype)
    r["dw"][...] = -_dot(du, s, _NT, dtype)
  r["dq"][...] = dq
  r["dk"][...] = dk
  r["du"][...] = du
  ds_scratch[...] = ds_prev

  @pl.when(step == n_chunks - 1)
  def _():
    r["ds0"][...] = ds_prev


# ------------------------------------------------------------------------------- pallas_calls

class _Specs(NamedTuple):
  keys: pl.BlockSpec            # [B, H, T, Dk] -> one chunk [C, Dk]
  values: pl.BlockSpec          # [B, H, T, Dv] -> [C, bv]
  gates: pl.BlockSpec           # [B, H, N, 1, C] -> [1, C]
  state: pl.BlockSpec           # [B, H, Dk, Dv] -> [Dk, bv], the same block for every chunk
  states: pl.BlockSpec          # [B, H, N, Dk, Dv] -> [Dk, bv] of this chunk
  key_partials: pl.BlockSpec    # [B, H, Dv/bv, T, Dk] -> [C, Dk] of this value block
  gate_partials: pl.BlockSpec   # [B, H, Dv/bv, N, 1, C] -> [1, C] of this value block


def _specs(c: int, dk: int, bv: int, n_chunks: int, *, reverse: bool) -> _Specs:
  """BlockSpecs on the grid (b, h, j = value block, i = step); step i holds chunk i, or chunk
  N−1−i when `reverse`."""
  sq = pl.squeezed

  def chunk(i):
    return n_chunks - 1 - i if reverse else i

  return _Specs(
      keys=pl.BlockSpec((sq, sq, c, dk), lambda b, h, j, i: (b, h, chunk(i), 0)),
      values=pl.BlockSpec((sq, sq, c, bv), lambda b, h, j, i: (b, h, chunk(i), j)),
      gates=pl.BlockSpec((sq, sq, sq, 1, c), lambda b, h, j, i: (b, h, chunk(i), 0, 0)),
      state=pl.BlockSpec((sq, sq, dk, bv), lambda b, h, j, i: (b, h, 0, j)),
      states=pl.BlockSpec((sq, sq, sq, dk, bv), lambda b, h, j, i: (b, h, chunk(i), 0, j)),
      key_partials=pl.BlockSpec((sq, sq, sq, c, dk), lambda b, h, j, i: (b, h, j, chunk(i), 0)),
      gate_partials=pl.BlockSpec((sq, sq, sq, sq, 1, c),
                                 lambda b, h, j, i: (b, h, j, chunk(i), 0, 0)))


def _call(setup: Setup, kernel, name: str, grid, inputs: dict, outputs: dict, scratch_shape):
  """`pallas_call` over named `{name: (array, spec)}` inputs and `{name: (ShapeDtypeStruct, spec)}`
  outputs; the kernel receives the refs in that order, then one fp32 VMEM scratch block."""
  names = (*inputs, *outputs)
  results = pl.pallas_call(
      functools.partial(kernel, names=names),
      grid=grid,
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=[spec for _, spec in outputs.values()],
      out_shape=[shape for shape, _ in outputs.values()],
      scratch_shapes=[pltpu.VMEM(scratch_shape, jnp.float32)],
      compiler_params=setup.compiler_params(),
      interpret=tpu_interpret(setup.interpret),
      name=f"{setup.op}_{name}",
  )(*(x for x, _ in inputs.values()))
  return dict(zip(outputs, results))


def _grid(setup: Setup, k, u):
  b, h, t, dk = k.shape
  dv = u.shape[-1]
  assert t % setup.chunk == 0 and dv % setup.block_v == 0, (k.shape, u.shape, setup)
  return (b, h, dv // setup.block_v, t // setup.chunk), dk, dv


def _forward(setup: Setup, q, k, u, w, g, s0, *, states: bool):
  """The forward pass: `{"o", "final"}`, or with `states` only `{"states"}` (`[B, H, N, Dk, Dv]`,
  the state entering each chunk)."""
  grid, dk, dv = _grid(setup, k, u)
  b, h, _, n = grid
  specs = _specs(setup.chunk, dk, setup.block_v, n, reverse=False)
  inputs = {"k": (k, specs.keys), "u": (u, specs.values), "g": (g, specs.gates),
            "s0": (s0, specs.state)}
  if w is not None:
    inputs["w"] = (w, specs.keys)
  if states:
    outputs = {"states": (jax.ShapeDtypeStruct((b, h, n, dk, dv), jnp.float32), specs.states)}
  else:
    inputs["q"] = (q, specs.keys)
    outputs = {"o": (jax.ShapeDtypeStruct(u.shape, u.dtype), specs.values),
               "final": (jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32), specs.state)}
  kernel = functools.partial(_forward_kernel, scale=setup.scale, n_chunks=n)
  return _call(setup, kernel, "states" if states else "forward", grid, inputs, outputs,
               (dk, setup.block_v))


def _backward(setup: Setup, q, k, u, w, g, s0, do, dfinal):
  """Gradients `(dq, dk, du, dw, dG, ds0)`, fp32, value-block partials summed."""
  states = _forward(setup, None, k, u, w, g, s0, states=True)["states"]
  grid, dk, dv = _grid(setup, k, u)
  b, h, nv, n = grid
  specs = _specs(setup.chunk, dk, setup.block_v, n, reverse=True)
  inputs = {"q": (q, specs.keys), "k": (k, specs.keys), "u": (u, specs.values),
            "g": (g, specs.gates), "states": (states, specs.states), "do": (do, specs.values),
            "dfinal": (dfinal.astype(jnp.float32), specs.state)}
  key_partials = jax.ShapeDtypeStruct((b, h, nv, *k.shape[2:]), jnp.float32)
  outputs = {"dq": (key_partials, specs.key_partials), "dk": (key_partials, specs.key_partials),
             "du": (jax.ShapeDtypeStruct(u.shape, jnp.float32), specs.values),
             "dg": (jax.ShapeDtypeStruct((b, h, nv, *g.shape[2:]), jnp.float32),
                    specs.gate_partials),
             "ds0": (jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32), specs.state)}
  if w is not None:
    inputs["w"] = (w, specs.keys)
    outputs["dw"] = (key_partials, specs.key_partials)
  kernel = functools.partial(_backward_kernel, scale=setup.scale, n_chunks=n)
  grads = _call(setup, kernel, "backward", grid, inputs, outputs, (dk, setup.block_v))
  total = {name: grads[name].sum(axis=2) for name in ("dq", "dk", "dw", "dg") if name in grads}
  return (total["dq"], total["dk"], grads["du"], total.get("dw"), total["dg"], grads["ds0"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunk_attention(setup: Setup, q, k, u, w, g, s0):
  """(o `[B, H, T, Dv]` in u's dtype, final state `[B, H, Dk, Dv]` fp32) of the chunk recurrence
  (module docstring) in kernel layout; `w` is None for SSD. Differentiable in every array."""
  out = _forward(setup, q, k, u, w, g, s0, states=False)
  return out["o"], out["final"]


def _chunk_attention_fwd(setup: Setup, q, k, u, w, g, s0):
  return chunk_attention(setup, q, k, u, w, g, s0), (q, k, u, w, g, s0)


def _chunk_attention_bwd(setup: Setup, residuals, cotangents):
  q, k, u, w, g, s0 = residuals
  do, dfinal = cotangents
  dq, dk, du, dw, dg, ds0 = _backward(setup, q, k, u, w, g, s0, do, dfinal)
  return (dq.astype(q.dtype), dk.astype(k.dtype), du.astype(u.dtype),
          None if w is None else dw.astype(w.dtype), dg, ds0)


chunk_attention.defvjp(_chunk_attention_fwd, _chunk_attention_bwd)

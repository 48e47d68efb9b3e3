"""SSD (Mamba-2 / scalar-gated linear attention) on TPU: Mosaic kernels, forward and backward.

    S_t = exp(g_t) S_{t−1} + k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

computed chunk by chunk (C = chunk_size) by `_tpu_chunks.chunk_attention` with pseudo-values
U = V: grid (B, H, Dv/bv, N) with the N chunks on the sequential ("arbitrary") axis and the
`[Dk, bv]` state in VMEM scratch. The backward is a `custom_vjp`: a states pass (the forward kernel
writing the state entering each chunk) and a reverse-chunk pass carrying dS in VMEM that writes dq,
dk, dv, dG and d(initial state) from the final-state cotangent on. XLA does only layout glue: the
`[B, T, H, D]` -> `[B, H, T, D]` transpose with zero padding of T (and, compiled, of the head dims
to 128 lanes), the within-chunk cumsum of g, sums of value-block partials, slicing back.

Inputs: q, k, v float32 or bfloat16 (a mixed call runs in their common dtype), g `[B, T, H]`
fp32. Compiled on a TPU, chunk_size must be one of 16, 32, 64, 128, 256; interpreted (anywhere
else, `pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")`), any size.

Unverified on real TPUs (only interpret mode ran; no TPU was available):
  - Mosaic lowering as a whole: the `[1, C]` <-> `[C, 1]` conversions by masked reductions over
    an iota identity, transposed-LHS `dot_general` (Kᵀ U, Pᵀ dO, Qᵀ dO, Wᵀ dU), `(1, 1)` keepdims
    reductions and lane-broadcasts, `Precision.HIGHEST` fp32 matmuls, C < 128 lane widths of the
    `[C, C]` blocks, the `[B, H, N, 1, C]` decay layout;
  - the `BLOCKS` table (bv and VMEM limits per generation) and its `device_kind` parsing; speed;
  - megacore sharding of the parallel axes (v4, v5p) and pipelining of the reverse index maps.
"""

from __future__ import annotations

from dlax_kernels import _tpu_chunks as chunks


def ssd(q, k, v, g, *, scale: float, chunk_size: int, initial_state=None,
        interpret: bool | None = None, block_v: int | None = None):
  """`dlax.ops.ssd` on TPU. q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g `[B, T, H]`,
  initial_state `[B, H, Dk, Dv]` or None. `interpret`: None (compiled on TPU, interpreted
  elsewhere) or a bool; `block_v`: value columns per program (default: per TPU generation).

  Returns (o `[B, T, H, Dv]` in v's dtype, final state `[B, H, Dk, Dv]` fp32).
  """
  setup = chunks.make_setup("ssd", q, k, v, scale=scale, chunk_size=chunk_size,
                            interpret=interpret, block_v=block_v)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  q_, k_, v_ = (chunks.heads_major(setup, x) for x in (q, k, v))
  s0 = chunks.padded_state(setup, initial_state, (b, h, k_.shape[-1], v_.shape[-1]))
  o, final = chunks.chunk_attention(setup, q_, k_, v_, None, chunks.chunk_log_decay(setup, g), s0)
  return chunks.time_major(o, t, dv).astype(v.dtype), final[:, :, :dk, :dv]

"""DLA (Dynamic Linear Attention, spec dla.md §4–7) with Mosaic TPU kernels.

`dla(q, k, v, g, lam, beta, ...)` has the signature and results of `dlax.ops.dla.chunked.
dla_chunked` (and of `dla_triton.dla`): (o `[B, T, H, Dv]` in v's dtype, final `DLACache`,
`DLADecisions` record). The pipeline is
`dla_common.run`, shared with the Triton backend:

  1. chunk math (XLA, differentiable; `dlax.ops.dla.chunk_math`): A_in, A_kk, Q̃, K̃′, K̂, Kγ, γ_end.
  2. bookkeeping (Pallas/Mosaic, `dla_tpu_book`): grid (B·H "parallel", N chunks "arbitrary"),
     the reference state X `[Dk, Dv]` and the slot metadata in VMEM scratch, pos0 in SMEM, a
     token loop on lane vectors; scores, boundaries, merges and the block layout per token.
  3. rank maps and block membership (XLA; `dla_common.slot_maps`).
  4. readout and slot-state pass (Pallas/Mosaic, `dla_tpu_slots`, `custom_vjp`): forward grid
     (B·H, Dv/bv, N chunks "arbitrary") with the K slot states `[K, Dk, bv]` in VMEM scratch
     updated in place, layout scalars in SMEM, initial / final states and every R-th chunk's
     states (checkpoints) moved by DMA; backward grid (B·H, Dv/bv, G·(2R−1)) that per checkpoint
     group recomputes R chunk-start states into VMEM, then walks the group's chunks in reverse
     with the slot cotangents in VMEM.

XLA also does the layout glue: chunking `[B, T, H, ·]` -> `[B·H, N, C, ·]` with zero padding of T,
padding head dims to 128 lanes (compiled), the value-block layout of the slot states, sums of
per-value-block partial cotangents, and the final cache. Gradients reach q, k, v, g, beta, lam
and the initial slot states (cotangents on o and the final slot states); decisions carry none.

Block sizes per TPU generation (`_tpu_chunks.BLOCKS`): the value block bv is the MXU width (128 on
v4 / v5e / v5p, 256 on v6e / v7, capped by Dv); Dk is never split. The backward holds R + 1 slot
stacks of `K·Dk·bv` in VMEM, so R = min(remat_every, what fits in 3/4 of the generation's scoped
VMEM limit): 8 at K = 30, Dk = 128 on every generation but v4 (5). Compiled, chunk_size must be
one of 16, 32, 64, 128, 256 and q, k, v float32 or bfloat16 (the kernels compute in fp32: the XLA
chunk math hands them fp32 operands, matmuls run at `Precision.HIGHEST`). Interpreted (anywhere
but a TPU, `pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")`): any C and
head dims, and float64 inputs run in float64.

Unverified on real TPUs (only interpret mode ran, and `jax.export` of the compiled path for
TPU, i.e. JAX's Pallas-to-Mosaic lowering, not Mosaic's own compiler passes; no TPU was
available):
  - Mosaic compilation of the bookkeeping token loop: `[1, Kp]` / `[1, C]` lane vectors, i1 masks
    broadcast from `[1, 1]`, int32 lane reductions (min, sum), `pltpu.roll` on int32 and fp32,
    dynamic-sublane loads / stores (`ref[pl.ds(i, 1), :]`), a `[1, C]·[C, Dv]` matmul;
  - the slot kernels: `fori_loop`s with bounds read from SMEM blocks (`[1, K+3]` int32 blocks of a
    `[B·H, N, 1, K+3]` array), dynamic leading-index loads / stores of the VMEM slot stacks, DMAs
    between HBM (`memory_space=ANY`) and VMEM scratch with a DMA semaphore, the `[C, 1]` <->
    `[1, C]` masked-reduction conversions, transposed-operand `dot_general`s, `[C, K]` blocks with
    K < 128 lanes;
  - the pipeline behaviour the backward schedule relies on: an output block is written back only
    when its block index changes (true of interpret mode and of Pallas TPU pipelining);
  - the VMEM budget, the `BLOCKS` table for DLA, megacore sharding of the parallel axes, speed
    (no bf16 MXU path: operands are fp32 at HIGHEST precision).
"""

from __future__ import annotations

import functools

import jax

from dlax_kernels import _tpu_chunks as chunks
from dlax_kernels.common import tpu_interpret
from dlax_kernels.dla_common import Kernels, check_options, run
from dlax_kernels.dla_tpu_book import Setup, bookkeeping
from dlax_kernels.dla_tpu_slots import slot_pass

DEFAULT_SCOPED_VMEM = 16 * chunks.MiB         # Mosaic's scoped limit where BLOCKS sets none


def _fail(message: str):
  raise ValueError(f"dla (pallas_tpu): {message}")


def group_size(remat_every: int, stack_bytes: int, vmem_limit_bytes: int | None) -> int:
  """Checkpoint group R: `remat_every`, capped so that R + 1 slot stacks of `stack_bytes` fit in
  3/4 of the scoped VMEM limit."""
  budget = (vmem_limit_bytes or DEFAULT_SCOPED_VMEM) * 3 // 4
  fit = budget // stack_bytes - 1
  if fit < 1:
    _fail(f"two slot stacks of {stack_bytes} bytes (capacity·Dk·block_v·4) do not fit in "
          f"{budget} bytes of VMEM; lower capacity or block_v, or use impl='chunked'")
  return min(remat_every, fit)


def make_setup(q, k, v, lam, beta, *, capacity, chunk_size: int, score_ref: str,
               remat_every: int, interpret: bool | None, block_v: int | None) -> Setup:
  """Validates a call and picks its blocks. Compiled (on a TPU): C in `CHUNK_SIZES`, fp32/bf16
  q, k, v, head dims padded to 128 lanes, bv and the VMEM limit from `BLOCKS`. Interpreted: any
  C and dtype, no padding, bv = Dv by default."""
  check_options("pallas_tpu", lam, capacity, chunk_size, score_ref)
  if not isinstance(remat_every, int) or remat_every < 1:
    _fail(f"remat_every must be a positive int, got {remat_every!r}")
  interpreted = tpu_interpret(interpret) is not False
  if not interpreted:
    if chunk_size not in chunks.CHUNK_SIZES:
      _fail(f"the compiled TPU kernels need chunk_size in {chunks.CHUNK_SIZES}, got {chunk_size}")
    for name, x in (("q", q), ("k", k), ("v", v), ("lam", lam), ("beta", beta)):
      if x is not None and x.dtype not in chunks.DTYPES:
        _fail(f"the compiled TPU kernels take float32 or bfloat16 {name}, got {x.dtype}")
  head_multiple = 1 if interpreted else chunks.LANES
  dk, dv = (-d % head_multiple + d for d in (q.shape[-1], v.shape[-1]))
  blocks = chunks.DEFAULT_BLOCKS if interpreted else chunks.blocks_for(
      jax.devices()[0].device_kind)
  if block_v is None:
    block_v = next((b for b in (blocks.block_v, chunks.LANES) if dv % b == 0), dv)
  elif dv % block_v or (not interpreted and block_v % chunks.LANES):
    _fail(f"block_v={block_v} must divide the value width {dv}"
          + ("" if interpreted else f" and be a multiple of {chunks.LANES}"))
  group = remat_every
  if not interpreted:
    group = group_size(remat_every, capacity * dk * block_v * 4, blocks.vmem_limit_bytes)
  return Setup(gdn=beta is not None, block_v=block_v, group=group, interpret=interpreted,
               head_multiple=head_multiple, vmem_limit_bytes=blocks.vmem_limit_bytes)


def dla(q, k, v, g, lam, beta=None, *, tau, capacity: int, chunk_size: int, scale: float,
        score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6, initial_cache=None,
        segment_ids=None, decisions=None, remat_every: int = 8, interpret: bool | None = None,
        block_v: int | None = None):
  """Chunked DLA on Mosaic TPU kernels; arguments and results as `dla_chunked` (spec §5.1).

  `remat_every`: chunks per checkpoint group of the slot states (capped by VMEM
  when compiled). `interpret`: None (compiled on a TPU, interpreted elsewhere) or a bool;
  `block_v`: value columns per slot-pass program (default: per TPU generation).
  """
  setup = make_setup(q, k, v, lam, beta, capacity=capacity, chunk_size=chunk_size,
                     score_ref=score_ref, remat_every=remat_every, interpret=interpret,
                     block_v=block_v)
  kernels = Kernels(bookkeeping=functools.partial(bookkeeping, setup=setup),
                    slot_pass=functools.partial(slot_pass, setup))
  return run(kernels, q, k, v, g, lam, beta, tau=tau, capacity=capacity, chunk_size=chunk_size,
             scale=scale, score_ref=score_ref, eps=eps, eps_r=eps_r, initial_cache=initial_cache,
             segment_ids=segment_ids, decisions=decisions)

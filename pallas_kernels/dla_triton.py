"""DLA (Dynamic Linear Attention, spec dla.md §4–7) with Triton-lowered Pallas kernels.

`dla(q, k, v, g, lam, beta, ...)` has the signature and results of `dlax.ops.dla.chunked.
dla_chunked`: (o `[B, T, H, Dv]` in v's dtype, final `DLACache`, `DLADecisions` record).

Shapes: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`, lam `[B, T, H, Kλ]`; K slots,
chunks of C tokens, N = ⌈T/C⌉ (the tail is padded with g = 0, k = v = 0 and excluded from the
decisions). Per call, chunks laid out `[B, H, N, C, ·]`:

  1. chunk math (XLA, differentiable; `dla_common`): A_in, A_kk, Q̃, K̃′, K̂, Kγ, γ_end.
  2. bookkeeping (Pallas, `dla_triton_book`, one program per (batch, head) looping over chunks
     and tokens, under stop_gradient): scores, boundaries, merges and the block layout after
     every token. Decisions only need one reference state (the open slot, or the base state),
     so this runs ahead of the K-slot pass.
  3. rank maps and block membership (XLA, `dla_common`, parallel over chunks, §7.2 step 2):
     `Λ_in[i,s] = lam[i, min(#{j<m_i : lo_i[j] > s}, Kλ−1)]`, `Λ_pre[i,j]` likewise for the
     pre-chunk slot starts, `W = Λ_in ⊙ A_in`, the chunk-end block of every token and the range
     of pre-chunk slots merged into each chunk-end block.
  4. readout and slot-state pass (Pallas, `dla_triton_slots`, forward and backward kernels under
     a `custom_vjp`): o and the slot states at every chunk end. The forward keeps the slot
     states of every `remat_every`-th chunk start; the backward recomputes a group's states from
     its checkpoint (§7.3), so the residual is `⌈N/remat_every⌉·K·Dk·Dv` per head.

Gradients reach q, k, v, g, beta (through 1 and 3, by JAX autodiff of the XLA parts), lam (through
the gathers of 3) and the initial slot states; decisions carry none (spec §4.3 "none").

Kernels take fp32/bf16 inputs and accumulate in fp32 (fp64 inputs run in fp64, interpret mode
only); for bf16 inputs the slot pass multiplies bf16 operands on tensor cores (the slot states
stay fp32 and are rounded only as matmul operands), for fp32 inputs its products are IEEE fp32.
Compiled, C and the head dims must be powers of two in [16, 256]; interpret mode (off GPU) takes
any sizes.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from dlax_kernels.common import triton_interpret
from dlax_kernels.dla_common import Kernels, SlotInputs, check_options, run
from dlax_kernels.dla_triton_book import bookkeeping
from dlax_kernels.dla_triton_slots import SlotConfig, slot_pass

_COMPILED_DTYPES = (jnp.bfloat16, jnp.float32)
_MIN_DIM, _MAX_DIM = 16, 256


def _fail(message: str):
  raise ValueError(f"dla (pallas_triton): {message}")


def _is_power_of_2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _check(q, v, lam, capacity, chunk_size, score_ref, interpret: bool) -> None:
  check_options("pallas_triton", lam, capacity, chunk_size, score_ref)
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


def dla(q, k, v, g, lam, beta=None, *, tau, capacity: int, chunk_size: int, scale: float,
        score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6, initial_cache=None,
        segment_ids=None, decisions=None, remat_every: int = 8):
  """Chunked DLA on Pallas kernels; arguments and results as `dla_chunked` (spec §5.1).

  `remat_every`: chunks per checkpoint group of the slot states (the backward
  recomputes the states inside a group). The XLA parts run their fp32 matmuls at full precision
  (no TF32), so that fp32 results match the float64 reference to ~1e-6.
  """
  interpret = triton_interpret()
  _check(q, v, lam, capacity, chunk_size, score_ref, interpret)
  dk, dv = q.shape[-1], v.shape[-1]
  cfg = SlotConfig(gdn=beta is not None, block_v=_block_v(dv), group=remat_every,
                   interpret=interpret, num_warps=4 if dk <= 64 else 8)
  slot_pass_fn = functools.partial(slot_pass, cfg)
  if jnp.dtype(q.dtype).itemsize == 2:
    slot_pass_fn = functools.partial(_with_narrow_operands, slot_pass_fn, q.dtype)
  kernels = Kernels(bookkeeping=functools.partial(bookkeeping, interpret=interpret),
                    slot_pass=slot_pass_fn)
  return run(kernels, q, k, v, g, lam, beta, tau=tau, capacity=capacity, chunk_size=chunk_size,
             scale=scale, score_ref=score_ref, eps=eps, eps_r=eps_r, initial_cache=initial_cache,
             segment_ids=segment_ids, decisions=decisions)


_MATMUL_OPERANDS = ("q_tilde", "k_hat", "k_gamma", "w", "v")


def _with_narrow_operands(slot_pass_fn, dtype, x: SlotInputs, layout):
  """The slot pass on 16-bit matmul operands (Q̃, K̂, Kγ, W, V in the inputs' dtype; λ, γ_end and
  the slot states stay fp32), so that its products run on tensor cores."""
  narrow = {name: getattr(x, name).astype(dtype) for name in _MATMUL_OPERANDS
            if getattr(x, name) is not None}
  return slot_pass_fn(x._replace(**narrow), layout)


def _block_v(dv: int) -> int:
  """Value block of the slot pass: 32 columns (more programs, fewer registers), or all of Dv."""
  return 32 if dv > 32 and dv % 32 == 0 else dv

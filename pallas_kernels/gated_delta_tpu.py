"""Gated DeltaNet (gated delta rule) on TPU: Mosaic kernels, forward and backward.

    S_t = exp(g_t) (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,      o_t = S_tᵀ (scale · q_t)

Chunked in the WY/UT form (C = chunk_size; G the log-decay cumulated within the chunk, γ = exp G,
Γ_is = exp(G_i − G_s)):

  1. WY solve, in XLA: per chunk, the unit lower-triangular system
     M = I + diag(β) ((K Kᵀ) ⊙ Γ ⊙ strict-tril), solved by a batched `solve_triangular` over all
     B·H·N chunks at once (no sequential dependency):
         U' = M⁻¹ diag(β) V   `[C, Dv]`,       W = M⁻¹ diag(β) diag(γ) K   `[C, Dk]`.
  2. Chunk recurrence, in Pallas (`_tpu_chunks.chunk_attention`): grid (B, H, Dv/bv, N) with the
     chunks on the sequential ("arbitrary") axis and the `[Dk, bv]` state S in VMEM scratch;
     per chunk U = U' − W S, o = (scale · Q Kᵀ ⊙ Γ) U + scale · diag(γ) Q S,
     S ← γ_{C−1} S + (diag(exp(G_{C−1} − G)) K)ᵀ U.

Backward: the chunk recurrence has its own `custom_vjp` (a states pass, then a reverse-chunk Pallas
pass carrying dS in VMEM from the final-state cotangent, writing dq, dk, dU', dW, dG and
d(initial state)); JAX's autodiff of the XLA solve turns dU' and dW into the remaining
contributions to dk, dv, dg and dbeta, and of the layout glue into dg (reverse cumsum) and the
input layout.

Inputs: q, k, v float32 or bfloat16 (common dtype), g and beta `[B, T, H]` (fp32 inside); U' and W
are stored in the input dtype, as in fla. Chunk sizes and interpret mode as in `ssd_tpu`.

Unverified on real TPUs (only interpret mode ran; no TPU was available): everything listed in
`ssd_tpu`'s docstring for the shared kernels, plus the `dot_general` U = U' − W S in-kernel,
the accuracy and speed of XLA's batched `solve_triangular` on TPU (C×C blocks, fp32) and of its
transpose in the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dlax_kernels import _tpu_chunks as chunks


def _wy_solve(k, v, g, beta):
  """(U', W) of every chunk: `M⁻¹ diag(β) [V | diag(γ) K]` (module docstring). k `[B, H, T, Dk]`,
  v `[B, H, T, Dv]` in the kernel dtype, g (cumulated), beta `[B, H, N, 1, C]` fp32."""
  b, h, t, dk = k.shape
  dv = v.shape[-1]
  n, c = g.shape[2], g.shape[-1]
  k_, v_ = k.reshape(b, h, n, c, dk), v.reshape(b, h, n, c, dv)
  g_col = jnp.swapaxes(g, -1, -2)                                # [B, H, N, C, 1]
  beta_col = jnp.swapaxes(beta, -1, -2)
  precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else lax.Precision.DEFAULT
  gram = jnp.einsum("bhnik,bhnsk->bhnis", k_, k_, precision=precision,
                    preferred_element_type=jnp.float32)
  strict = jnp.tril(jnp.ones((c, c), bool), k=-1)
  decay = jnp.exp(jnp.where(strict, g_col - g, -jnp.inf))        # Γ ⊙ strict-tril
  lower = jnp.eye(c, dtype=jnp.float32) + beta_col * gram * decay
  rhs = beta_col * jnp.concatenate([v_.astype(jnp.float32),
                                    k_.astype(jnp.float32) * jnp.exp(g_col)], axis=-1)
  solved = jax.scipy.linalg.solve_triangular(lower, rhs, lower=True, unit_diagonal=True)
  u_free, w = solved[..., :dv], solved[..., dv:]
  return u_free.reshape(v.shape).astype(v.dtype), w.reshape(k.shape).astype(k.dtype)


def gated_delta(q, k, v, g, beta, *, scale: float, chunk_size: int, initial_state=None,
                interpret: bool | None = None, block_v: int | None = None):
  """`dlax.ops.gated_delta` on TPU. q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`,
  initial_state `[B, H, Dk, Dv]` or None. `interpret`, `block_v` as in `ssd_tpu.ssd`.

  Returns (o `[B, T, H, Dv]` in v's dtype, final state `[B, H, Dk, Dv]` fp32).
  """
  setup = chunks.make_setup("gated_delta", q, k, v, scale=scale, chunk_size=chunk_size,
                            interpret=interpret, block_v=block_v)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  q_, k_, v_ = (chunks.heads_major(setup, x) for x in (q, k, v))
  s0 = chunks.padded_state(setup, initial_state, (b, h, k_.shape[-1], v_.shape[-1]))
  g_ = chunks.chunk_log_decay(setup, g)
  u_free, w = _wy_solve(k_, v_, g_, chunks.chunked_gates(setup, beta))
  o, final = chunks.chunk_attention(setup, q_, k_, u_free, w, g_, s0)
  return chunks.time_major(o, t, dv).astype(v.dtype), final[:, :, :dk, :dv]

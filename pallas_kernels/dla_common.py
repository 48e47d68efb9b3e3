"""Backend-neutral parts of the DLA kernels (spec dla.md §4–7), in XLA: the per-chunk quantities,
the score formulas, the rank maps and block membership, and the driver `run`, which strings
a backend's two Pallas kernels together (`dla_triton`: Triton, `dla_tpu`: Mosaic).

Shapes: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`, lam `[B, T, H, Kλ]`; K slots,
chunks of C tokens, N = ⌈T/C⌉ (the tail is padded with g = 0, k = v = 0 and excluded from the
decisions). Per call, chunks laid out `[B, H, N, C, ·]`:

  1. chunk math (`chunk_math`, differentiable): A_in, A_kk, Q̃, K̃′, K̂, Kγ, γ_end (below).
  2. bookkeeping (a backend kernel, under stop_gradient): scores, boundaries, merges and the
     block layout after every token. Decisions only need one reference state (the open slot,
     or the base state), so this runs ahead of the K-slot pass.
  3. rank maps and block membership (`slot_maps`, parallel over chunks, §7.2 step 2):
     `Λ_in[i,s] = lam[i, min(#{j<m_i : lo_i[j] > s}, Kλ−1)]`, `Λ_pre[i,j]` likewise for the
     pre-chunk slot starts, `W = Λ_in ⊙ A_in`, the chunk-end block of every token and the range
     of pre-chunk slots merged into each chunk-end block.
  4. readout and slot-state pass (a backend kernel with a `custom_vjp`): o and the final slot
     states.

Chunk math, per chunk (local index i, leading axes `...`). With the inclusive cumulative
log-decay `G_i`, `γ_i = exp(G_i)`, `γ′_i = exp(G_{i−1})` (γ′_0 = 1), `Γ[i,s] = exp(G_i − G_s)`
for s ≤ i (a masked segment sum) and `Γ′[i,s] = Γ[i−1,s]` for s < i:

    Ψ   = I (Mamba-2, δ = 0);  GDN (δ = 1): (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β)
    A_in = scale·((Q Kᵀ) ⊙ Γ) Ψ              [C, C]   q_i's read of token s's write
    A_kk = ((K Kᵀ) ⊙ Γ′) Ψ                   [C, C]   k_i's response to token s's write (before i)
    Q̃ = scale·diag(γ)Q − δ A_in diag(γ)K     [C, Dk]  read of a pre-chunk state S: (Q̃ S)_i
    K̃′ = diag(γ′)K − δ A_kk diag(γ)K         [C, Dk]  key response of a pre-chunk state
    K̂ = Ψᵀ diag(Γ[C−1, :]) K                 [C, Dk]  token s's write at the chunk end: K̂[s] v_sᵀ
    F S = γ_{C−1} S − δ K̂ᵀ (diag(γ) K S)             a pre-chunk state carried to the chunk end

With segment resets, every pair term is masked to the same segment and Q̃, K̃′ are zero from the
first reset on. Gradients reach q, k, v, g, beta through 1 and 3 (JAX autodiff of XLA), lam
through the gathers of 3, and the initial slot states through 4; decisions carry none (spec
§4.3 "none").
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Cache(NamedTuple):
  """The fields of `dlax.ops.DLACache` (spec §5.3), same order."""
  S: jax.Array
  n: jax.Array
  info: jax.Array
  lo: jax.Array
  m: jax.Array
  open_sq: jax.Array
  total_sq: jax.Array
  pos: jax.Array


class Decisions(NamedTuple):
  """The fields of `dlax.ops.DLADecisions` (spec §5.4), same order, `[B, T, H]`."""
  boundary: jax.Array
  score: jax.Array
  merge_idx: jax.Array
  num_slots: jax.Array


class Options(NamedTuple):
  """Static options of one call."""
  tau: float
  capacity: int
  scale: float
  score_ref: str
  eps: float
  eps_r: float


class Book(NamedTuple):
  """Scalar carry of the bookkeeping per (batch, head): `[..., K]` slot metadata, `[...]`
  scalars."""
  m: jax.Array
  n: jax.Array
  info: jax.Array
  lo: jax.Array
  open_sq: jax.Array
  total_sq: jax.Array


class Layout(NamedTuple):
  """Bookkeeping results `[B, H, N, C(, K)]`, and the layout at each chunk start."""
  boundary: jax.Array
  score: jax.Array
  merge_idx: jax.Array
  num_slots: jax.Array
  lo_hist: jax.Array          # [B, H, N, C, K] block starts after each token
  lo_start: jax.Array         # [B, H, N, K] block starts at the chunk start
  m_start: jax.Array          # [B, H, N] live slots at the chunk start


class SlotInputs(NamedTuple):
  """Differentiable inputs of the slot pass, per (batch·head) `[BH, N, ...]` (k_gamma: None for
  Mamba-2)."""
  q_tilde: jax.Array      # [BH, N, C, Dk]
  k_hat: jax.Array        # [BH, N, C, Dk]
  k_gamma: jax.Array | None
  end_decay: jax.Array    # [BH, N]
  w: jax.Array            # [BH, N, C, C]
  v: jax.Array            # [BH, N, C, Dv]
  lam_pre: jax.Array      # [BH, N, K, C]
  s0: jax.Array           # [BH, K, Dk, Dv] initial slot states


class SlotLayout(NamedTuple):
  """Block layout per chunk (int32, no gradient)."""
  counts: jax.Array       # [BH, N, 2]: live slots at the chunk start and end
  first: jax.Array        # [BH, N, K+1]: pre-chunk slots first[b] ≤ j < first[b+1] -> block b
  blk: jax.Array          # [BH, N, C]: chunk-end block of each token (−1: padding)


class Kernels(NamedTuple):
  """A backend's kernels for `run`.

  bookkeeping(opts, inputs, book, ref_state, pos0, *, heads, length) -> (final Book `[BH, (K)]`,
    Layout `[BH, N, ...]`); inputs as made by `book_inputs` (`[BH, N, ...]`, per batch
    `resets [B, N, C]`), book `[BH, (K)]`, ref_state `[BH, Dk, Dv]`, pos0 `[B]`.
  slot_pass(x: SlotInputs, layout: SlotLayout) -> (o `[BH, N, C, Dv]`, final slot states
    `[BH, K, Dk, Dv]`), differentiable in x.
  """
  bookkeeping: Callable
  slot_pass: Callable


# --- chunk math (§7.1, §6.3) -------------------------------------------------------------------


class ChunkMath(NamedTuple):
  """State-free quantities of every chunk (module docstring); leading axes `...`.

  carry `[..., C]` bool: token i still continues the pre-chunk state (no reset up to i).
  k_gamma: diag(γ) K for GDN, None for Mamba-2. end_decay `[...]`: γ_{C−1}.
  """

  carry: jax.Array
  a_in: jax.Array
  a_kk: jax.Array
  q_tilde: jax.Array
  k_tilde: jax.Array
  k_hat: jax.Array
  k_gamma: jax.Array | None
  end_decay: jax.Array


def _decay_matrix(g):
  """`Γ[..., i, s] = exp(Σ_{r=s+1..i} g_r)` for s ≤ i, else 0, from a masked cumulative sum."""
  c = g.shape[-1]
  strict = jnp.tril(jnp.ones((c, c), bool), k=-1)
  sums = jnp.cumsum(jnp.where(strict, g[..., :, None], 0.0), axis=-2)
  return jnp.where(jnp.tril(jnp.ones((c, c), bool)), jnp.exp(sums), 0.0)


def _shift_down(x, axis: int, fill):
  """`out[i] = x[i − 1]` along `axis`, `out[0] = fill`."""
  x = jnp.moveaxis(x, axis, 0)
  x = jnp.concatenate([jnp.full_like(x[:1], fill), x[:-1]], axis=0)
  return jnp.moveaxis(x, 0, axis)


def _delta_rule_inverse(k, decay, beta):
  """Ψ = (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β), by forward substitution."""
  c = k.shape[-2]
  eye = jnp.eye(c, dtype=k.dtype)
  gram = jnp.einsum("...ik,...sk->...is", k, k) * decay
  lower = eye + jnp.tril(beta[..., :, None] * gram, k=-1)
  rhs = jnp.broadcast_to(eye * beta[..., None, :], lower.shape)
  return jax.scipy.linalg.solve_triangular(lower, rhs, lower=True, unit_diagonal=True)


def chunk_math(q, k, g, beta=None, resets=None, *, scale: float) -> ChunkMath:
  """q, k `[..., C, Dk]`, g (and beta) `[..., C]`, resets `[..., C]` bool (broadcasting)."""
  gamma = jnp.exp(jnp.cumsum(g, axis=-1))
  gamma_prev = _shift_down(gamma, -1, 1.0)
  decay = _decay_matrix(g)
  decay_prev = _shift_down(decay, -2, 0.0)
  carry = jnp.ones(g.shape, bool)
  if resets is not None:
    segment = jnp.cumsum(resets, axis=-1)
    carry = jnp.broadcast_to(segment == 0, g.shape)
    same = segment[..., :, None] == segment[..., None, :]
    decay = jnp.where(same, decay, 0.0)
    decay_prev = jnp.where(same, decay_prev, 0.0)

  a_in = scale * jnp.einsum("...ik,...sk->...is", q, k) * decay
  a_kk = jnp.einsum("...ik,...sk->...is", k, k) * decay_prev
  q_tilde = scale * gamma[..., None] * q
  k_tilde = gamma_prev[..., None] * k
  k_hat = decay[..., -1, :, None] * k
  k_gamma = None
  if beta is not None:
    psi = _delta_rule_inverse(k, decay, beta)
    a_in, a_kk = a_in @ psi, a_kk @ psi
    k_hat = jnp.swapaxes(psi, -1, -2) @ k_hat
    k_gamma = gamma[..., None] * k
    q_tilde = q_tilde - a_in @ k_gamma
    k_tilde = k_tilde - a_kk @ k_gamma
  q_tilde = jnp.where(carry[..., None], q_tilde, 0.0)
  k_tilde = jnp.where(carry[..., None], k_tilde, 0.0)
  return ChunkMath(carry=carry, a_in=a_in, a_kk=a_kk, q_tilde=q_tilde, k_tilde=k_tilde,
                   k_hat=k_hat, k_gamma=k_gamma, end_decay=gamma[..., -1])


def transport(cm: ChunkMath, state):
  """`F S` for states `[..., Dk, Dv]` (leading axes as cm's, without C)."""
  out = cm.end_decay[..., None, None] * state
  if cm.k_gamma is None:
    return out
  response = jnp.einsum("...ck,...kv->...cv", cm.k_gamma, state)
  return out - jnp.einsum("...ck,...cv->...kv", cm.k_hat, response)


# --- score math (§6.1–6.2), elementwise: usable inside kernels ---------------------------------


def score_from_norms(a, b, x, *, size: int, eps: float, eps_r: float):
  """I from a = ‖X‖², b = ‖Y‖², x = ⟨X,Y⟩ (§6.1); `size` = Dk·Dv."""
  rho_x, rho_y = a / size + eps_r, b / size + eps_r
  d2 = a / rho_x + b / rho_y - 2.0 * x / jnp.sqrt(rho_x * rho_y)
  return jnp.sqrt(jnp.maximum(d2, 0.0)) / (jnp.sqrt(b / rho_y) + eps)


def open_slot_norms(open_sq, u_sq, u_dot_v, k_sq, v_sq, alpha, beta=None):
  """(‖R‖², ⟨R, c⟩, ‖c‖²) of §6.2, R = A_t(S_open), c = w_t."""
  if beta is None:
    return alpha * alpha * open_sq, alpha * u_dot_v, k_sq * v_sq
  r_sq = alpha * alpha * (open_sq - (2.0 * beta - beta * beta * k_sq) * u_sq)
  return r_sq, alpha * beta * (1.0 - beta * k_sq) * u_dot_v, beta * beta * k_sq * v_sq


# --- layout glue ---------------------------------------------------------------------------------


def check_options(backend: str, lam, capacity, chunk_size, score_ref) -> None:
  """The checks every backend shares; errors read `dla (<backend>): ...`."""
  def fail(message):
    raise ValueError(f"dla ({backend}): {message}")

  if not isinstance(capacity, int) or capacity < 2:
    fail(f"capacity must be an int >= 2, got {capacity!r}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    fail(f"chunk_size must be a positive int, got {chunk_size!r}")
  if score_ref not in ("open", "total"):
    fail(f"score_ref must be 'open' or 'total', got {score_ref!r}")
  if not 1 <= lam.shape[-1] <= capacity:
    fail(f"lam's last dim Klam must be in [1, capacity={capacity}], got {lam.shape[-1]}")


def take_slot(x, index):
  """`x[b, h, index[b, h]]` for `x [B, H, K, ...]`, index clipped to 0..K−1."""
  index = jnp.clip(index, 0, x.shape[2] - 1)
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=2)[:, :, 0]


def to_chunks(x, chunk: int, heads: bool = True):
  """`[B, T, (H), ...]` -> zero-padded `[B, (H), N, C, ...]`."""
  if x is None:
    return None
  pad = -x.shape[1] % chunk
  if pad:
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, chunk, *x.shape[2:])                     # [B, N, C, (H), ...]
  return jnp.moveaxis(x, 3, 1) if heads else x


def from_chunks(x, t: int):
  """`[B, H, N, C, ...]` -> `[B, T, H, ...]` (drops the padded tail)."""
  x = jnp.moveaxis(x, 1, 3)                                              # [B, N, C, H, ...]
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def segment_resets(segment_ids):
  """`[B, T]`: the token's segment id differs from the previous token's (never token 0)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def empty_cache(b, h, k, dk, dv, dtype) -> Cache:
  return Cache(S=jnp.zeros((b, h, k, dk, dv), dtype), n=jnp.zeros((b, h, k), jnp.int32),
               info=jnp.zeros((b, h, k), dtype), lo=jnp.zeros((b, h, k), jnp.int32),
               m=jnp.zeros((b, h), jnp.int32), open_sq=jnp.zeros((b, h), dtype),
               total_sq=jnp.zeros((b, h), dtype), pos=jnp.zeros((b,), jnp.int32))


def flat(x):
  """`[B, H, ...]` -> `[B·H, ...]`."""
  return None if x is None else x.reshape(-1, *x.shape[2:])


def _ranks(lo_hist, m_hist, positions):
  """`#{j < m_i : lo_i[j] > p}`: lo_hist `[..., C, K]`, m_hist `[..., C]`, positions `[..., P]`
  (broadcasting against the leading axes) -> `[..., C, P]` int32."""
  live = jnp.arange(lo_hist.shape[-1]) < m_hist[..., None]
  newer = lo_hist[..., None, :] > positions[..., None, :, None]
  return jnp.sum(newer & live[..., None, :], axis=-1, dtype=jnp.int32)


def _lam_weights(lam, ranks):
  """`lam[i, min(rank, Kλ−1)]`: lam `[..., C, Kλ]`, ranks `[..., C, P]` -> `[..., C, P]`."""
  return jnp.take_along_axis(lam, jnp.minimum(ranks, lam.shape[-1] - 1), axis=-1)


def _block_of(lo, m, positions):
  """Index of the live block holding each position (−1 if none): lo `[..., K]`, m `[...]`,
  positions `[..., P]` -> `[..., P]`."""
  live = jnp.arange(lo.shape[-1]) < m[..., None]
  started = (lo[..., None, :] <= positions[..., None]) & live[..., None, :]
  return jnp.sum(started, axis=-1, dtype=jnp.int32) - 1


def slot_maps(layout: Layout, lam, a_in, positions, valid):
  """λ weights and block membership of every chunk (§7.2 step 2), `[B, H, N, ...]`.

  Returns (W = Λ_in ⊙ A_in `[.., C, C]`, Λ_pre `[.., K, C]`, counts `[.., 2]`, first `[.., K+1]`,
  blk `[.., C]`).
  """
  k = layout.lo_hist.shape[-1]
  lam_in = _lam_weights(lam, _ranks(layout.lo_hist, layout.num_slots, positions))
  lam_pre = _lam_weights(lam, _ranks(layout.lo_hist, layout.num_slots, layout.lo_start))
  pre_live = jnp.arange(k) < layout.m_start[..., None]                   # [B, H, N, K]
  lam_pre = jnp.where(pre_live[..., None, :], lam_pre, 0.0)
  lo_end, m_end = layout.lo_hist[..., -1, :], layout.num_slots[..., -1]
  blk = jnp.where(valid, _block_of(lo_end, m_end, positions), -1)
  target = jnp.where(pre_live, _block_of(lo_end, m_end, layout.lo_start), -1)
  first = jnp.sum((target[..., None, :] >= 0) & (target[..., None, :] < jnp.arange(k + 1)[:, None]),
                  axis=-1, dtype=jnp.int32)
  counts = jnp.stack([layout.m_start, m_end], axis=-1).astype(jnp.int32)
  return lam_in * a_in, jnp.swapaxes(lam_pre, -1, -2), counts, first, blk


def book_inputs(opts: Options, cm: ChunkMath, v, g, beta, k, decisions, chunk: int) -> dict:
  """State-free inputs of the bookkeeping kernels, `[B·H, N, ...]`: k_tilde, k_hat `[.., C, Dk]`,
  k_gamma (GDN), end_decay `[BH, N]`, v `[.., C, Dv]`, scalars `[.., 4, C]` (α, β, ‖k‖², ‖v‖²),
  rows `[.., C, C]` (open: A_kk for GDN, A_kk ⊙ V Vᵀ for Mamba-2) or r_in = A_kk V `[.., C, Dv]`
  (total), forced `[.., 2, C]` int (injected boundary, merge index) or None."""
  ones = jnp.ones_like(g)
  scalars = jnp.stack([jnp.exp(g), ones if beta is None else beta, jnp.sum(k * k, -1),
                       jnp.sum(v * v, -1)], axis=-2)                     # [B, H, N, 4, C]
  inputs = dict(k_tilde=cm.k_tilde, k_hat=cm.k_hat, k_gamma=cm.k_gamma, end_decay=cm.end_decay,
                v=v, scalars=scalars)
  if opts.score_ref == "open":
    inputs["rows"] = cm.a_kk if beta is not None else cm.a_kk * jnp.einsum("...iv,...sv->...is",
                                                                          v, v)
  else:
    inputs["r_in"] = jnp.einsum("...is,...sv->...iv", cm.a_kk, v)
  if decisions is not None:
    inputs["forced"] = jnp.stack([to_chunks(decisions.boundary.astype(jnp.int32), chunk),
                                  to_chunks(decisions.merge_idx.astype(jnp.int32), chunk)],
                                 axis=-2)
  return {name: flat(a) for name, a in inputs.items()}


# --- the driver ------------------------------------------------------------------------------


def run(kernels: Kernels, q, k, v, g, lam, beta=None, *, tau, capacity: int, chunk_size: int,
        scale: float, score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6,
        initial_cache=None, segment_ids=None, decisions=None):
  """Chunked DLA on a backend's kernels; arguments and results as `dla_chunked` (spec §5.1):
  (o `[B, T, H, Dv]` in v's dtype, final `Cache`, `Decisions` record).

  The XLA parts run their fp32 matmuls at full precision (no TF32 / bf16 passes), so that fp32
  results match the float64 reference to ~1e-6.
  """
  with jax.default_matmul_precision("highest"):
    return _run(kernels, q, k, v, g, lam, beta, tau=tau, capacity=capacity,
                chunk_size=chunk_size, scale=scale, score_ref=score_ref, eps=eps, eps_r=eps_r,
                initial_cache=initial_cache, segment_ids=segment_ids, decisions=decisions)


def _run(kernels: Kernels, q, k, v, g, lam, beta, *, tau, capacity, chunk_size, scale,
         score_ref, eps, eps_r, initial_cache, segment_ids, decisions):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  c = chunk_size
  acc = jnp.result_type(jnp.float32, q, k, v, g, lam, *(() if beta is None else (beta,)))
  cache = (empty_cache(b, h, capacity, dk, dv, acc) if initial_cache is None
           else Cache(*initial_cache))
  cache = cache._replace(S=cache.S.astype(acc), info=cache.info.astype(acc),
                         open_sq=cache.open_sq.astype(acc), total_sq=cache.total_sq.astype(acc))
  opts = Options(tau=tau, capacity=capacity, scale=scale, score_ref=score_ref, eps=eps,
                 eps_r=eps_r)

  qc, kc, vc, lamc = (to_chunks(x.astype(acc), c) for x in (q, k, v, lam))
  gc, betac = (None if x is None else to_chunks(x.astype(acc), c) for x in (g, beta))
  n_chunks = qc.shape[2]
  resets = None if segment_ids is None else to_chunks(segment_resets(segment_ids), c, False)
  valid = (jnp.arange(n_chunks * c) < t).reshape(n_chunks, c)
  cm = chunk_math(qc, kc, gc, betac, None if resets is None else resets[:, None], scale=scale)

  inputs = book_inputs(opts, cm, vc, gc, betac, kc, decisions, c)
  if resets is not None:
    inputs["resets"] = resets.astype(jnp.int32)
  if score_ref == "open":
    ref_state = jnp.where((cache.m > 0)[..., None, None], take_slot(cache.S, cache.m - 1), 0.0)
  else:
    ref_state = jnp.sum(cache.S, axis=2)
  book0 = Book(m=cache.m, n=cache.n, info=cache.info, lo=cache.lo, open_sq=cache.open_sq,
               total_sq=cache.total_sq)
  book, layout = kernels.bookkeeping(opts, inputs, Book(*(flat(a) for a in book0)),
                                     flat(ref_state), cache.pos, heads=h, length=t)
  book = Book(*(a.reshape(b, h, *a.shape[1:]) for a in book))
  layout = Layout(*(a.reshape(b, h, *a.shape[1:]) for a in layout))

  positions = (cache.pos[:, None, None, None] + jnp.arange(n_chunks * c).reshape(n_chunks, c))
  w, lam_pre, counts, first, blk = slot_maps(layout, lamc, cm.a_in, positions, valid)
  x = SlotInputs(q_tilde=cm.q_tilde, k_hat=cm.k_hat, k_gamma=cm.k_gamma, end_decay=cm.end_decay,
                 w=w, v=vc, lam_pre=lam_pre, s0=cache.S)
  o, states = kernels.slot_pass(SlotInputs(*(flat(a) for a in x)),
                                SlotLayout(*(flat(a) for a in (counts, first, blk))))
  o = from_chunks(o.reshape(b, h, n_chunks, c, dv), t).astype(v.dtype)
  states = states.reshape(b, h, capacity, dk, dv)

  final = Cache(S=states, n=book.n, info=book.info, lo=book.lo, m=book.m,
                open_sq=jnp.sum(take_slot(states, book.m - 1) ** 2, axis=(-2, -1)),
                total_sq=jnp.sum(jnp.sum(states, axis=2) ** 2, axis=(-2, -1)),
                pos=cache.pos + t)
  record = Decisions(*(from_chunks(a, t) for a in (layout.boundary, layout.score,
                                                   layout.merge_idx, layout.num_slots)))
  return o, final, record

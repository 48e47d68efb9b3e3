"""PyTorch port of `dlax.models.LanguageModel`: every mixer family, for `transformers`.

Pure PyTorch + `transformers` (no jax, no dlax): `dlax.convert.lm_export.export_lm` copies this
file and `configuration_dlax.py` into the exported folder, which then loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.

Each module follows its dlax layer line by line (parameter names included, so the export is a
renaming plus transposes):

- `Attention`        dlax/layers/attention.py   RoPE (rotate-half), GQA, causal softmax
- `Mamba2Mixer`      dlax/layers/mamba2.py      in_proj → conv+SiLU → Δ, g → core → D-skip,
                                                gated RMSNorm → out_proj
- `GatedDeltaNet`    dlax/layers/gated_deltanet.py
- `MultiStateCore`   dlax/layers/multistate.py  λ = softplus(L ⊙ logits), then one of:
    - `chunked_linear_attention`  SSD (Mamba-2) / gated delta rule, chunk-parallel form
    - `log_linear_recurrent`      Log-Linear attention, Fenwick levels (spec dla.md §3)
    - `dla_recurrent`             DLA, the reference recurrence of spec dla.md §4.6

Speed: the SSD / gated-delta cores are chunked (O(T·C) per chunk, like dlax's XLA path); the
Log-Linear and DLA cores are token-by-token Python loops over T (the reference speed: correct
and simple, slow for long sequences). There is no decode cache: `forward` recomputes the whole
sequence, and `generate` (use_cache=False) works but costs O(T) forwards.

Precision: states, gates, norms and scores run in at least fp32, as in dlax. Logits are fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_dlax import DlaxConfig

try:                                  # transformers >= 5: skips tensors loaded from a checkpoint
  from transformers import initialization as init
except ImportError:                   # pragma: no cover - older transformers
  init = None

LAMBDA_INIT_STD = 0.006               # W_λ ~ N(0, 0.006²) (dlax.layers.multistate)


def _acc(dtype: torch.dtype) -> torch.dtype:
  """Accumulator dtype: fp32, or fp64 for fp64 inputs (dlax's `state_dtype`)."""
  return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------ small layers

def rms_norm(x, weight, eps: float):
  """`x · rsqrt(mean(x²) + eps) · weight` over the last axis (statistics in ≥ fp32)."""
  h = x.to(_acc(x.dtype))
  h = h * torch.rsqrt(torch.mean(h * h, dim=-1, keepdim=True) + eps)
  return h.to(x.dtype) * weight.to(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale `weight [dim]`: `[..., dim] -> [..., dim]`."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
  """Mamba-2's gated norm `RMSNorm(x ⊙ silu(z))` over the full last axis (one group)."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x, z):
    """x, z `[..., dim]` -> `[..., dim]` in x's dtype."""
    acc = _acc(x.dtype)
    h = x.to(acc) * F.silu(z.to(acc))
    h = h * torch.rsqrt(torch.mean(h * h, dim=-1, keepdim=True) + self.eps)
    return h.to(x.dtype) * self.weight.to(x.dtype)


class CausalConv1d(nn.Module):
  """Depthwise causal conv: `y_t = bias + Σ_j w[:, 0, j] · x_{t−W+1+j}`.

  `weight [C, 1, W]` (tap W−1 multiplies the current token; dlax stores its transpose `[W, C]`),
  optional `bias [C]`. `[B, T, C] -> [B, T, C]`, zero history before token 0.
  """

  def __init__(self, channels: int, kernel_size: int, bias: bool):
    super().__init__()
    self.kernel_size = kernel_size
    bound = kernel_size ** -0.5
    self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size).uniform_(-bound, bound))
    self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None

  def forward(self, x):
    channels = x.shape[-1]
    padded = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.conv1d(padded, self.weight.to(x.dtype), bias, groups=channels).transpose(1, 2)


def linear(d_in: int, d_out: int) -> nn.Linear:
  return nn.Linear(d_in, d_out, bias=False)


class SwiGLU(nn.Module):
  """`down(silu(gate(x)) ⊙ up(x))`, no biases."""

  def __init__(self, d_model: int, d_ff: int):
    super().__init__()
    self.gate, self.up, self.down = linear(d_model, d_ff), linear(d_model, d_ff), \
        linear(d_ff, d_model)

  def forward(self, x):
    return self.down(F.silu(self.gate(x)) * self.up(x))


def l2_normalize(x, eps: float = 1e-6):
  """`x · rsqrt(Σx² + eps)` over the last axis (in ≥ fp32), returned in x's dtype."""
  h = x.to(_acc(x.dtype))
  return (h * torch.rsqrt(torch.sum(h * h, dim=-1, keepdim=True) + eps)).to(x.dtype)


# --------------------------------------------------------------------------------- attention

def apply_rope(x, theta: float):
  """Rotate-half RoPE on positions 0..T−1. x `[B, T, H, hd]` -> same shape and dtype."""
  acc = _acc(x.dtype)
  t, half = x.shape[1], x.shape[-1] // 2
  inv_freq = theta ** (-torch.arange(half, dtype=acc) / half)                # [hd/2]
  angles = torch.arange(t, dtype=acc)[:, None] * inv_freq                      # [T, hd/2]
  cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]           # [T, 1, hd/2]
  x1, x2 = x.to(acc).chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
  """Causal multi-head attention with RoPE and grouped-query heads: `[B, T, d] -> [B, T, d]`.

  Query head i reads key/value head `i // (H / KV)`; optional per-head RMSNorm on q and k
  (before RoPE); softmax in ≥ fp32 with scale `hd^−½`.
  """

  def __init__(self, config: DlaxConfig):
    super().__init__()
    c = config.attention
    self.num_heads, self.num_kv_heads, self.head_dim = (c["num_heads"], c["num_kv_heads"],
                                                        c["head_dim"])
    self.rope_theta = float(c["rope_theta"])
    d, h, kv, hd = config.d_model, self.num_heads, self.num_kv_heads, self.head_dim
    self.q_proj, self.k_proj = linear(d, h * hd), linear(d, kv * hd)
    self.v_proj, self.o_proj = linear(d, kv * hd), linear(h * hd, d)
    self.q_norm = RMSNorm(hd, config.norm_eps) if c["qk_norm"] else None
    self.k_norm = RMSNorm(hd, config.norm_eps) if c["qk_norm"] else None

  def forward(self, x):
    b, t, _ = x.shape
    h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = self.q_proj(x).view(b, t, h, hd)
    k = self.k_proj(x).view(b, t, kv, hd)
    v = self.v_proj(x).view(b, t, kv, hd)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, self.rope_theta), apply_rope(k, self.rope_theta)
    acc = _acc(q.dtype)
    q = q.view(b, t, kv, h // kv, hd)
    scores = torch.einsum("btkgd,bskd->bkgts", q.to(acc), k.to(acc)) * hd ** -0.5
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~causal, torch.finfo(acc).min)
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("bkgts,bskd->btkgd", probs, v.to(acc)).reshape(b, t, h * hd)
    return self.o_proj(o.to(x.dtype))


# ------------------------------------------------------------- SSD / gated delta (chunked)

def chunked_linear_attention(q, k, v, g, beta, *, scale: float, chunk_size: int):
  """Mamba-2's SSD (`beta=None`) or the gated delta rule, from a zero state, chunk by chunk.

  Recurrence (per batch, head): `S_t = A_t(S_{t−1}) + w_t`, `o_t = S_tᵀ (scale·q_t)`, with
  `A_t(S) = α_t S, w_t = k_t v_tᵀ` (SSD) or `A_t(S) = α_t (I − β_t k_t k_tᵀ) S,
  w_t = β_t k_t v_tᵀ` (gated delta), `α_t = exp(g_t)`. Per chunk of C tokens (cumulative
  log-decay G, `Γ[i,j] = exp(G_i − G_j)`, `P = scale (Q Kᵀ) ⊙ Γ ⊙ tril`):

      U = V                                                       (SSD)
      U = (I + diag(β)((K Kᵀ) ⊙ Γ ⊙ tril_strict))⁻¹ diag(β) (V − diag(e^G) K S)   (gated delta)
      O = scale·diag(e^G) Q S + P U
      S ← e^{G_{C−1}} S + (diag(e^{G_{C−1} − G}) K)ᵀ U

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g, beta: `[B, T, H]` (beta None for SSD).

  Returns:
    o `[B, T, H, Dv]` in the accumulator dtype (≥ fp32).
  """
  acc = _acc(v.dtype)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  to_heads = lambda x: None if x is None else x.to(acc).transpose(1, 2)      # [B, H, T, ...]
  q, k, v, g, beta = (to_heads(x) for x in (q, k, v, g, beta))
  state = torch.zeros(b, h, dk, dv, dtype=acc, device=v.device)
  c = min(chunk_size, t)
  incl = torch.ones(c, c, dtype=torch.bool, device=v.device).tril()
  strict = incl.tril(-1)
  outputs = []
  for start in range(0, t, c):
    end = min(start + c, t)
    n = end - start
    qc, kc, vc, gc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], g[:, :, start:end]
    cum = torch.cumsum(gc, dim=-1)                                           # [B, H, n]
    gamma = torch.exp((cum[..., :, None] - cum[..., None, :])
                      .masked_fill(~incl[:n, :n], -math.inf))                # [B, H, n, n]
    decay_in = torch.exp(cum)[..., None]                                     # e^{G_i}
    if beta is None:
      u = vc
    else:
      bc = beta[:, :, start:end, None]
      lower = torch.eye(n, dtype=acc, device=v.device) + \
          bc * (kc @ kc.transpose(-1, -2)) * gamma * strict[:n, :n]
      u = torch.linalg.solve_triangular(lower, bc * (vc - decay_in * (kc @ state)),
                                        upper=False, unitriangular=True)
    p = scale * (qc @ kc.transpose(-1, -2)) * gamma
    outputs.append(scale * decay_in * (qc @ state) + p @ u)
    to_end = torch.exp(cum[..., -1:] - cum)[..., None]                       # e^{G_{n−1} − G_s}
    state = torch.exp(cum[..., -1])[..., None, None] * state + (kc * to_end).transpose(-1, -2) @ u
  return torch.cat(outputs, dim=2).transpose(1, 2)


def transition(states, k, g, beta):
  """`A_t` on every state. states `[B, H, S, Dk, Dv]`, k `[B, H, Dk]`, g, beta `[B, H]`."""
  alpha = torch.exp(g)[..., None, None, None]
  if beta is None:
    return alpha * states
  response = torch.einsum("bhk,bhjkv->bhjv", k, states)                     # kᵀ S_j
  erase = beta[..., None, None, None] * k[:, :, None, :, None] * response[:, :, :, None, :]
  return alpha * (states - erase)


def write(k, v, beta):
  """`w_t = k vᵀ` (or `β k vᵀ`): `[B, H, Dk, Dv]`."""
  c = k[..., :, None] * v[..., None, :]
  return c if beta is None else beta[..., None, None] * c


# ------------------------------------------------------------------------ Log-Linear (§3)

def log_linear_recurrent(q, k, v, g, lam, beta, *, scale: float):
  """Log-Linear attention from position 0, token by token (spec dla.md §3; dlax's
  `log_linear_step_reference`).

  Per token t: (1) for t ≥ 1, the Fenwick carry: levels below `ℓ(t, t−1) = bit_length(t ⊕ (t−1))`
  are summed into that level and cleared; (2) `A_t` on every level; (3) `w_t` into level 0;
  (4) `o_t = Σ_ℓ λ_{t, min(ℓ, L−1)} S_ℓᵀ (scale·q_t)`.

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g, beta: `[B, T, H]` (beta None for Mamba-2).
    lam: `[B, T, H, L]` readout weights.

  Returns:
    o `[B, T, H, Dv]` in the accumulator dtype.
  """
  acc = _acc(v.dtype)
  b, t, h, dk = q.shape
  num_levels = max(1, (t - 1).bit_length() + 1)        # ℓ(t, s) ≤ bit_length(T − 1)
  states = torch.zeros(b, h, num_levels, dk, v.shape[-1], dtype=acc, device=v.device)
  level = torch.arange(num_levels, device=v.device)
  level_lam = torch.clamp(level, max=lam.shape[-1] - 1)
  zero = torch.zeros((), dtype=acc, device=v.device)
  outputs = []
  for i in range(t):
    q_t, k_t, v_t, g_t, lam_t = (x[:, i].to(acc) for x in (q, k, v, g, lam))
    beta_t = None if beta is None else beta[:, i].to(acc)
    if i >= 1:                                        # Fenwick carry
      target = min((i ^ (i - 1)).bit_length(), num_levels - 1)
      below = (level < target)[:, None, None]
      merged = torch.where(below, states, zero).sum(dim=2, keepdim=True)
      states = torch.where(below, zero, states) + torch.where(
          (level == target)[:, None, None], merged, zero)
    states = transition(states, k_t, g_t, beta_t)
    states = states + torch.where((level == 0)[:, None, None], write(k_t, v_t, beta_t)[:, :, None],
                                  zero)
    weights = lam_t[..., level_lam]                                          # [B, H, levels]
    outputs.append(torch.einsum("bhl,bhk,bhlkv->bhv", weights, scale * q_t, states))
  return torch.stack(outputs, dim=1)


# ---------------------------------------------------------------------------------- DLA (§4)

def merge_adjacent(x, merge_idx, combine: bool = True):
  """Merges slots (i, i+1) of `x [B, H, K, ...]` (i = merge_idx `[B, H]`; −1: no merge) and
  shifts the later slots down; the merged slot is `x_i + x_{i+1}`, the freed last slot zero."""
  k = x.shape[2]
  slots = torch.arange(k, device=x.device)
  idx = torch.where((merge_idx >= 0) & (merge_idx < k - 1), merge_idx, k)[..., None]  # [B, H, 1]
  src = slots + (slots > idx).long()                                          # [B, H, K]
  extra = (1,) * (x.ndim - 3)
  gather = lambda index: torch.take_along_dim(
      x, index.clamp(max=k - 1).view(*index.shape, *extra), dim=2)
  out = torch.where((src < k).view(*src.shape, *extra), gather(src), torch.zeros_like(x))
  if combine:
    partner = gather(torch.minimum(idx + 1, torch.full_like(idx, k - 1)).expand_as(src))
    out = out + torch.where((slots == idx).view(*src.shape, *extra), partner,
                            torch.zeros_like(x))
  return out


def take_slot(x, index):
  """`x[b, h, index[b, h]]` for `x [B, H, K, ...]`, index clipped to 0..K−1."""
  index = index.clamp(0, x.shape[2] - 1)
  return torch.take_along_dim(x, index.view(*index.shape, 1, *(1,) * (x.ndim - 3)), dim=2)[:, :, 0]


def information_score(new, ref, eps: float, eps_r: float):
  """`I = ‖N(new) − N(ref)‖_F / (‖N(ref)‖_F + eps)`, `N(X) = X / sqrt(mean(X²) + eps_r)` over
  a whole `[Dk, Dv]` state (spec §4.2). new, ref `[B, H, Dk, Dv]` -> `[B, H]`."""
  rms_map = lambda s: s / torch.sqrt(torch.mean(s * s, dim=(-2, -1), keepdim=True) + eps_r)
  frobenius = lambda s: torch.sqrt(torch.sum(s * s, dim=(-2, -1)))
  return frobenius(rms_map(new) - rms_map(ref)) / (frobenius(rms_map(ref)) + eps)


def merge_index(n, info):
  """Least-dense adjacent pair `argmin_i (Ī_i + Ī_{i+1}) / (n_i + n_{i+1})`, ties → oldest.
  n, info `[B, H, K]` -> `[B, H]` int64."""
  pair_n = (n[..., :-1] + n[..., 1:]).to(info.dtype)
  pair_info = info[..., :-1] + info[..., 1:]
  density = torch.where(pair_n > 0, pair_info / torch.where(pair_n > 0, pair_n, 1.0),
                        torch.full_like(pair_info, math.inf))
  return torch.argmin(density, dim=-1)          # first minimum: the oldest pair on ties


def dla_step(q, k, v, g, lam, beta, cache: dict, *, tau: float, scale: float, score_ref: str,
             eps: float, eps_r: float):
  """One token of the DLA recurrence (spec §4.6; dlax's `dla_step_reference`), every (b, h).

  cache: {"S": `[B, H, K, Dk, Dv]` slot states (slot 0 oldest, slot m−1 open), "n", "info":
  `[B, H, K]` tokens and summed scores per block, "m": `[B, H]` live slots}.

      S_i ← A_t(S_i) for every slot;  c = w_t
      I = τ if m = 0, else score(S_open after A_t, c) ("open") or score(ΣS_i, ΣA_t(S_i) + c)
      b = (I ≥ τ) or m = 0
      b: merge the least dense adjacent pair if m = K, then append (c, n=1, Ī=I)
      else: S_open += c, n_open += 1, Ī_open += I
      o_t = Σ_{j<m} λ_{t, min(j, Kλ−1)} S_{m−1−j}ᵀ (scale·q_t)           (read after write)

  Returns (o `[B, H, Dv]`, new cache, (boundary, merge_idx) `[B, H]`).
  """
  prev, n, info, m = cache["S"], cache["n"], cache["info"], cache["m"]
  capacity = prev.shape[2]
  states = transition(prev, k, g, beta)
  c = write(k, v, beta)
  with torch.no_grad():                      # decisions get no gradient (as in dlax)
    if score_ref == "open":
      ref = take_slot(states, m - 1)
      score = information_score(ref + c, ref, eps, eps_r)
    else:
      score = information_score(states.sum(dim=2) + c, prev.sum(dim=2), eps, eps_r)
  score = torch.where(m == 0, torch.full_like(score, tau), score)
  boundary = (score >= tau) | (m == 0)
  merges = boundary & (m == capacity)
  merge_idx = torch.where(merges, merge_index(n, info), torch.full_like(m, -1))

  m = m - merges.long()
  slot = torch.where(boundary, m, m - 1)
  hit = torch.arange(capacity, device=m.device) == slot[..., None]          # [B, H, K]
  states = merge_adjacent(states, merge_idx)
  states = states + torch.where(hit[..., None, None], c[:, :, None], torch.zeros_like(states))
  n = merge_adjacent(n, merge_idx) + hit.long()
  info = merge_adjacent(info, merge_idx) + torch.where(hit, score[..., None],
                                                       torch.zeros_like(info))
  m = m + boundary.long()

  rank = m[..., None] - 1 - torch.arange(capacity, device=m.device)         # [B, H, K]
  weight = torch.take_along_dim(lam, rank.clamp(0, lam.shape[-1] - 1), dim=-1)
  weight = torch.where(rank >= 0, weight, torch.zeros_like(weight))
  o = torch.einsum("bhj,bhk,bhjkv->bhv", weight, scale * q, states)
  return o, dict(S=states, n=n, info=info, m=m), (boundary, merge_idx)


def dla_recurrent(q, k, v, g, lam, beta, *, capacity: int, tau: float, scale: float,
                  score_ref: str = "open", eps: float = 1e-6, eps_r: float = 1e-6,
                  return_decisions: bool = False):
  """DLA from an empty cache, token by token (the reference speed: a Python loop over T).

  Args:
    q, k: `[B, T, H, Dk]`. v: `[B, T, H, Dv]`. g, beta: `[B, T, H]` (beta None for Mamba-2).
    lam: `[B, T, H, Kλ]` readout weights by recency rank.

  Returns:
    o `[B, T, H, Dv]` in the accumulator dtype; with `return_decisions` also the boundaries
    (bool) and merge indices (−1: none), `[B, T, H]` each.
  """
  acc = _acc(v.dtype)
  b, t, h, dk = q.shape
  device = v.device
  cache = dict(S=torch.zeros(b, h, capacity, dk, v.shape[-1], dtype=acc, device=device),
               n=torch.zeros(b, h, capacity, dtype=torch.long, device=device),
               info=torch.zeros(b, h, capacity, dtype=acc, device=device),
               m=torch.zeros(b, h, dtype=torch.long, device=device))
  outputs, records = [], []
  for i in range(t):
    q_t, k_t, v_t, g_t, lam_t = (x[:, i].to(acc) for x in (q, k, v, g, lam))
    beta_t = None if beta is None else beta[:, i].to(acc)
    o, cache, record = dla_step(q_t, k_t, v_t, g_t, lam_t, beta_t, cache, tau=tau, scale=scale,
                                score_ref=score_ref, eps=eps, eps_r=eps_r)
    outputs.append(o)
    records.append(record)
  o = torch.stack(outputs, dim=1)
  if not return_decisions:
    return o
  return o, tuple(torch.stack(r, dim=1) for r in zip(*records))


# ------------------------------------------------------------------------ multi-state core

class MultiStateCore(nn.Module):
  """The recurrent core of the Mamba-2 / GDN mixers (dlax.layers.multistate).

  Holds `lam_scale` `[H, Kλ]` (L of `λ = softplus(L ⊙ logits)`) in the multi-state modes.
  """

  def __init__(self, config: DlaxConfig, num_heads: int):
    super().__init__()
    self.mode, self.num_heads = config.multistate, num_heads
    self.chunk_size, self.num_lambda = config.chunk_size, config.num_lambda
    self.dla = dict(config.dla)
    self.lam_scale = nn.Parameter(torch.ones(num_heads, self.num_lambda)) \
        if self.num_lambda else None

  def forward(self, q, k, v, g, lam_logits, beta=None, *, scale: float):
    """q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`, lam_logits
    `[B, T, H·Kλ]` -> o `[B, T, H, Dv]` in v's dtype."""
    if self.mode == "none":
      o = chunked_linear_attention(q, k, v, g, beta, scale=scale, chunk_size=self.chunk_size)
      return o.to(v.dtype)
    acc = _acc(self.lam_scale.dtype)
    shape = (*lam_logits.shape[:-1], self.num_heads, self.num_lambda)
    lam = F.softplus(self.lam_scale.to(acc) * lam_logits.to(acc).reshape(shape))
    if self.mode == "log_linear":
      o = log_linear_recurrent(q, k, v, g, lam, beta, scale=scale)
    else:
      c = self.dla
      o = dla_recurrent(q, k, v, g, lam, beta, capacity=c["capacity"], tau=float(c["tau"]),
                        scale=scale, score_ref=c["score_ref"], eps=float(c["eps"]),
                        eps_r=float(c["eps_r"]))
    return o.to(v.dtype)


# ---------------------------------------------------------------------------- Mamba-2 / GDN

class Mamba2Mixer(nn.Module):
  """Mamba-2 mixer (ngroups = 1): `[B, T, d] -> [B, T, d]`.

  in_proj: d -> [z (d_in), x (d_in), B (N), C (N), dt (H), λ-logits (H·Kλ)]; causal conv (with
  bias) + SiLU on [x, B, C]; `Δ = softplus(dt + dt_bias)`, `g = −Δ·exp(A_log)`, `v = Δ·x`,
  `q = C`, `k = B` (all heads), core with scale 1; `y = o + D·x`, `RMSNorm(y ⊙ silu(z))`,
  out_proj. A_log, D, dt_bias: `[H]`.
  """

  def __init__(self, config: DlaxConfig):
    super().__init__()
    c = config.mamba2
    self.d_inner = c["expand"] * config.d_model
    self.d_state, self.headdim = c["d_state"], c["headdim"]
    self.num_heads = h = self.d_inner // self.headdim
    self.core = MultiStateCore(config, h)
    width = 2 * self.d_inner + 2 * self.d_state + h + h * self.core.num_lambda
    self.in_proj = linear(config.d_model, width)
    self.conv = CausalConv1d(self.d_inner + 2 * self.d_state, c["conv_kernel"], bias=True)
    self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
    self.D = nn.Parameter(torch.ones(h))
    self.dt_bias = nn.Parameter(torch.zeros(h))
    self.norm = GatedRMSNorm(self.d_inner, config.norm_eps)
    self.out_proj = linear(self.d_inner, config.d_model)

  def forward(self, x):
    b, t, _ = x.shape
    h, p, n, d_in = self.num_heads, self.headdim, self.d_state, self.d_inner
    z, xbc, dt, lam_logits = torch.split(
        self.in_proj(x), [d_in, d_in + 2 * n, h, h * self.core.num_lambda], dim=-1)
    xs, bs, cs = torch.split(F.silu(self.conv(xbc)), [d_in, n, n], dim=-1)
    f32 = _acc(self.A_log.dtype)
    delta = F.softplus(dt.to(f32) + self.dt_bias.to(f32))                    # [B, T, H]
    g = -delta * torch.exp(self.A_log.to(f32))
    xs = xs.reshape(b, t, h, p)
    v = (xs.to(f32) * delta[..., None]).to(xs.dtype)
    q = cs[:, :, None].expand(b, t, h, n)
    k = bs[:, :, None].expand(b, t, h, n)
    o = self.core(q, k, v, g, lam_logits, scale=1.0)
    y = o + (self.D.to(f32)[:, None] * xs).to(o.dtype)
    return self.out_proj(self.norm(y.reshape(b, t, d_in), z))


class GatedDeltaNet(nn.Module):
  """Gated DeltaNet mixer: `[B, T, d] -> [B, T, d]`.

  q/k/v projections, each with a causal conv (no bias) and SiLU; q, k L2-normalised per head;
  `β = sigmoid(b_proj x)`, `g = −exp(A_log)·softplus(a_proj x + dt_bias)`, λ-logits `l_proj x`;
  core with scale `Dk^−½`; `o = RMSNorm_head(o) ⊙ silu(g_proj x)`, o_proj.
  """

  def __init__(self, config: DlaxConfig):
    super().__init__()
    c = config.gated_delta
    d = config.d_model
    h, dk, dv = c["num_heads"], c["head_dim_k"], c["head_dim_v"]
    self.num_heads, self.head_dim_k, self.head_dim_v = h, dk, dv
    self.core = MultiStateCore(config, h)
    self.q_proj, self.k_proj, self.v_proj = linear(d, h * dk), linear(d, h * dk), \
        linear(d, h * dv)
    conv = lambda channels: CausalConv1d(channels, c["conv_kernel"], bias=False)
    self.q_conv, self.k_conv, self.v_conv = conv(h * dk), conv(h * dk), conv(h * dv)
    self.a_proj, self.b_proj, self.g_proj = linear(d, h), linear(d, h), linear(d, h * dv)
    self.l_proj = linear(d, h * self.core.num_lambda) if self.core.num_lambda else None
    self.A_log = nn.Parameter(torch.zeros(h))
    self.dt_bias = nn.Parameter(torch.zeros(h))
    self.o_norm = RMSNorm(dv, config.norm_eps)
    self.o_proj = linear(h * dv, d)

  def forward(self, x):
    b, t, _ = x.shape
    h, dk, dv = self.num_heads, self.head_dim_k, self.head_dim_v
    q = l2_normalize(F.silu(self.q_conv(self.q_proj(x))).reshape(b, t, h, dk))
    k = l2_normalize(F.silu(self.k_conv(self.k_proj(x))).reshape(b, t, h, dk))
    v = F.silu(self.v_conv(self.v_proj(x))).reshape(b, t, h, dv)
    f32 = _acc(self.A_log.dtype)
    beta = torch.sigmoid(self.b_proj(x).to(f32))                             # [B, T, H]
    g = -torch.exp(self.A_log.to(f32)) * F.softplus(self.a_proj(x).to(f32) +
                                                    self.dt_bias.to(f32))
    lam_logits = None if self.l_proj is None else self.l_proj(x)
    o = self.core(q, k, v, g, lam_logits, beta, scale=dk ** -0.5)
    gate = self.g_proj(x).reshape(b, t, h, dv)
    o = self.o_norm(o) * F.silu(gate)
    return self.o_proj(o.reshape(b, t, h * dv))


# ------------------------------------------------------------------------------------ model

MIXER_CLASSES = {"attention": Attention, "mamba2": Mamba2Mixer, "gated_delta": GatedDeltaNet}


class DlaxBlock(nn.Module):
  """`x + mixer(mixer_norm(x))`, then `x + mlp(mlp_norm(x))`."""

  def __init__(self, config: DlaxConfig):
    super().__init__()
    self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
    self.mixer = MIXER_CLASSES[config.mixer](config)
    self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
    self.mlp = SwiGLU(config.d_model, config.d_ff)

  def forward(self, x):
    x = x + self.mixer(self.mixer_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class DlaxPreTrainedModel(PreTrainedModel):
  config_class = DlaxConfig
  base_model_prefix = "model"
  _no_split_modules = ["DlaxBlock"]
  # dlax keeps decay parameters and λ scales in fp32 whatever the weights' dtype.
  _keep_in_fp32_modules_strict = ["A_log", "dt_bias", "lam_scale", "mixer.D"]

  @torch.no_grad()
  def _init_weights(self, module):
    """dlax's initialisers (used for tensors a checkpoint does not provide)."""
    if init is None:      # pragma: no cover - older transformers
      return
    std = self.config.init_std
    if isinstance(module, (nn.Linear, nn.Embedding)):
      init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, (RMSNorm, GatedRMSNorm)):
      init.ones_(module.weight)
    elif isinstance(module, CausalConv1d):
      bound = module.kernel_size ** -0.5
      init.uniform_(module.weight, -bound, bound)
      if module.bias is not None:
        init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, MultiStateCore) and module.lam_scale is not None:
      init.ones_(module.lam_scale)
    if isinstance(module, GatedDeltaNet) and module.l_proj is not None:
      init.normal_(module.l_proj.weight, mean=0.0, std=LAMBDA_INIT_STD)
    if isinstance(module, (Mamba2Mixer, GatedDeltaNet)):
      h = module.num_heads
      if isinstance(module, Mamba2Mixer):
        init.copy_(module.A_log, torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        init.ones_(module.D)
        w, lam_width = module.in_proj.weight, h * module.core.num_lambda
        if lam_width and not getattr(w, "_is_hf_initialized", False):   # W_λ rows of in_proj
          w[w.shape[0] - lam_width:].normal_(0.0, LAMBDA_INIT_STD)
      else:
        init.copy_(module.A_log, torch.log(torch.empty(h).uniform_(1.0, 16.0)))
      dt = torch.exp(torch.empty(h).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
      init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))     # softplus⁻¹(dt)


class DlaxModel(DlaxPreTrainedModel):
  """Embedding, `n_layers` blocks and the final RMSNorm: ids `[B, T]` -> hidden `[B, T, d]`."""

  def __init__(self, config: DlaxConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
    self.layers = nn.ModuleList(DlaxBlock(config) for _ in range(config.n_layers))
    self.norm = RMSNorm(config.d_model, config.norm_eps)
    self.post_init()

  def get_input_embeddings(self):
    return self.embed_tokens

  def set_input_embeddings(self, value):
    self.embed_tokens = value

  def forward(self, input_ids):
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x)
    return self.norm(x)


class DlaxForCausalLM(DlaxPreTrainedModel, GenerationMixin):
  """`DlaxModel` plus the LM head (`lm_head`, or the embedding table when
  `tie_embeddings`): `forward(input_ids [B, T], labels=None) -> CausalLMOutput(loss, logits)`,
  fp32 logits `[B, T, V]`; loss is the mean next-token cross entropy (labels −100 ignored)."""

  def __init__(self, config: DlaxConfig):
    super().__init__(config)
    self.model = DlaxModel(config)
    self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model,
                                                                config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def get_output_embeddings(self):
    return self.lm_head

  def prepare_inputs_for_generation(self, input_ids, **kwargs):
    return {"input_ids": input_ids}       # no decode cache: every step reruns the sequence

  def forward(self, input_ids, labels=None, attention_mask=None, **kwargs):
    """`attention_mask` may only be all ones (the recurrent mixers have no padding mask)."""
    if attention_mask is not None and not bool(torch.all(attention_mask == 1)):
      raise NotImplementedError("DlaxForCausalLM: padding masks are not supported; pass "
                                "unpadded sequences")
    h = self.model(input_ids)
    weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
    logits = F.linear(h, weight.to(h.dtype)).float()
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
    return CausalLMOutput(loss=loss, logits=logits)

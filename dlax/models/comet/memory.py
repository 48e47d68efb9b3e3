"""CoMeT memory plug-in (spec §4, §7.1–7.2): memory nets, carried state, inject and update.

Per layer there is a global net (RMSNorm_g, a gate over `[candidate; state]`, RLA_g) and a temp net
(RMSNorm_t, RLA_t). The carried state is a pure `LayerMemory`; `inject_memory` writes it into a
chunk's slot rows before the layer and `update_memory` reads it back from the layer's output.

NNX attribute paths ↔ reference state-dict keys (`model.layers.{i}.` prefix; Linear kernels are
`[in, out]`, PyTorch weights `[out, in]`, so transpose): see `OFFICIAL_KEYS`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dlax.layers.initializers import dense
from dlax.layers.norms import RMSNorm
from dlax.models.comet.config import FIFO_MODES, GATES

INIT_STD = 0.02

# NNX path (relative to the layer) → (reference key suffix, transpose on import/export).
OFFICIAL_KEYS = {
    "global_memory_net.norm.weight": ("global_memory_net.norm.weight", False),
    "global_memory_net.g_proj.kernel": ("global_memory_net.g_proj.weight", True),
    "global_memory_net.o_proj.down_proj.kernel":
        ("global_memory_net.o_proj.down_proj.weight", True),
    "global_memory_net.o_proj.up_proj.kernel": ("global_memory_net.o_proj.up_proj.weight", True),
    "temp_memory_net.norm.weight": ("temp_memory_net.0.weight", False),
    "temp_memory_net.rla.down_proj.kernel": ("temp_memory_net.1.down_proj.weight", True),
    "temp_memory_net.rla.up_proj.kernel": ("temp_memory_net.1.up_proj.weight", True),
}


class LowRankAdapter(nnx.Module):
  """RLA: `x + (x · W_down) · W_up`, rank r, no bias; `[..., d] -> [..., d]`."""

  def __init__(self, dim: int, rank: int = 8, *, init_std: float = INIT_STD, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.down_proj = dense(dim, rank, **kw)
    self.up_proj = dense(rank, dim, **kw)

  def __call__(self, x):
    return x + self.up_proj(self.down_proj(x)).astype(x.dtype)


class GlobalMemoryNet(nnx.Module):
  """RMSNorm_g, gate `g_proj` (kernel `[2d, 1]` for gate="slot", `[2d, d]` for "elementwise";
  rows `[0:d]` act on the candidate, `[d:2d]` on the state) and RLA_g (`o_proj`).

  `gate_offset` is a test hook added to the gate logits (0 in normal use).
  """

  def __init__(self, dim: int, *, rank: int = 8, eps: float = 1.1920929e-7, gate: str = "slot",
               init_std: float = INIT_STD, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if gate not in GATES:
      raise ValueError(f"GlobalMemoryNet: gate must be one of {GATES}, got {gate!r}")
    self.gate = gate
    self.gate_offset = 0.0
    self.norm = RMSNorm(dim, eps=eps, param_dtype=param_dtype)
    self.g_proj = dense(2 * dim, 1 if gate == "slot" else dim, init_std=init_std, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)
    self.o_proj = LowRankAdapter(dim, rank, init_std=init_std, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

  def gate_logits(self, candidate, state):
    """candidate, state: `[..., d]` → logits `[..., 1]` (slot) or `[..., d]` (elementwise)."""
    return self.g_proj(jnp.concatenate([candidate, state], axis=-1)) + self.gate_offset

  def update(self, readouts, state, started):
    """§7.2 global path. readouts, state: `[B, G, d]`; started: `[B]` → new state `[B, G, d]`.

    Rows not started take the candidate `RMSNorm_g(readouts)` as is (no gate).
    """
    candidate = self.norm(readouts).astype(state.dtype)
    g = jax.nn.sigmoid(self.gate_logits(candidate, state)).astype(state.dtype)
    gated = g * state + (1 - g) * candidate
    return jnp.where(started[:, None, None], gated, candidate)

  def __call__(self, state):
    """M = RLA_g(S): `[..., d] -> [..., d]`."""
    return self.o_proj(state)


class TempMemoryNet(nnx.Module):
  """`RLA_t(RMSNorm_t(x))`; `norm`/`rla` are the reference's indices 0/1."""

  def __init__(self, dim: int, *, rank: int = 8, eps: float = 1e-12, init_std: float = INIT_STD,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim, eps=eps, param_dtype=param_dtype)
    self.rla = LowRankAdapter(dim, rank, init_std=init_std, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)

  def __call__(self, x):
    return self.rla(self.norm(x))


def memory_nets(dim: int, config, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
  """(GlobalMemoryNet or None, TempMemoryNet or None) for one layer per `CometConfig`."""
  kw = dict(rank=config.rla_rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  global_net = (GlobalMemoryNet(dim, eps=config.eps_global_norm, gate=config.gate, **kw)
                if config.use_global else None)
  temp_net = TempMemoryNet(dim, eps=config.eps_temp_norm, **kw) if config.use_temp else None
  return global_net, temp_net


class LayerMemory(NamedTuple):
  """One layer's carried state (§7.1).

  S: `[B, G, d]` global state (normalised space). Q: `[B, Bt, d]` FIFO, right-aligned: live rows
  are `[Bt − n_temp, Bt)`, oldest first; dead rows are 0. n_temp: `[B]` int32. started: `[B]` bool.
  is_pad: `[B, Bt]` bool, the official FIFO's pad memories (§6.5); None for the clean FIFO, whose
  live rows are all real. The next chunk attends to the oldest `n_temp − Σ is_pad` live rows (all
  of them in clean mode, where that count is n_temp).
  """
  S: jax.Array
  Q: jax.Array
  n_temp: jax.Array
  started: jax.Array
  is_pad: jax.Array | None = None

  @classmethod
  def empty(cls, batch: int, global_size: int, temp_size: int, dim: int,
            dtype=jnp.float32, *, fifo_mode: str = "clean") -> LayerMemory:
    if fifo_mode not in FIFO_MODES:
      raise ValueError(f"LayerMemory: fifo_mode must be one of {FIFO_MODES}, got {fifo_mode!r}")
    is_pad = jnp.zeros((batch, temp_size), bool) if fifo_mode == "official" else None
    return cls(jnp.zeros((batch, global_size, dim), dtype),
               jnp.zeros((batch, temp_size, dim), dtype),
               jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool), is_pad)

  @property
  def n_attended(self) -> jax.Array:
    """`[B]` temp slots the next chunk attends to: the real rows (= n_T of the layout)."""
    if self.is_pad is None:
      return self.n_temp
    return self.n_temp - jnp.sum(self.is_pad, axis=-1, dtype=jnp.int32)


def _gather_rows(x, idx):
  """x `[B, L, d]`, idx `[B, K]` → `[B, K, d]`; out-of-range rows are filled with 0."""
  return jnp.take_along_axis(x, idx[..., None], axis=1, mode="fill", fill_value=0)


def _scatter_rows(x, idx, values):
  """x `[B, L, d]`, idx `[B, K]`, values `[B, K, d]`: `x[b, idx[b, k]] = values[b, k]`, dropping
  out-of-range indices."""
  scatter = lambda xb, ib, vb: xb.at[ib].set(vb, mode="drop")
  return jax.vmap(scatter)(x, idx, values.astype(x.dtype))


def inject_memory(x, memory: LayerMemory, M, gslot_idx, tslot_idx):
  """Overwrites the chunk's memory slots (§7.2, before the layer).

  Args:
    x: `[B, L, d]` hidden states. memory: the layer's carried state. M: `[B, G, d]` = RLA_g(S).
    gslot_idx: `[B, G]`; tslot_idx: `[B, Bt]` (invalid entries ≥ L are dropped).

  Returns:
    `[B, L, d]`: global slot j ← M[j] where started; temp slot j ← Q[Bt − n_temp + j] for
    j < `memory.n_attended`, i.e. the oldest queue rows. With the official FIFO the queue may hold
    more rows (n_temp) than the chunk attends to; the reference puts the surplus in masked slots
    at the chunk end, which can change nothing, so they are not materialised.
  """
  length = x.shape[1]
  if gslot_idx.shape[-1]:
    gidx = jnp.where(memory.started[:, None], gslot_idx, length)
    x = _scatter_rows(x, gidx, M)
  bt = tslot_idx.shape[-1]
  if bt:
    j = jnp.arange(bt, dtype=jnp.int32)
    live = j < memory.n_attended[:, None]
    src = jnp.minimum(bt - memory.n_temp[:, None] + j, bt - 1)
    tidx = jnp.where(live, tslot_idx, length)
    x = _scatter_rows(x, tidx, _gather_rows(memory.Q, src))
  return x


def _rows_after(flags):
  """`[B, K]` bool → `[B, K]` int32: how many later rows (higher index) are set."""
  flags = flags.astype(jnp.int32)
  return jnp.cumsum(flags[:, ::-1], axis=1)[:, ::-1] - flags


def push_queue(Q, n_temp, is_pad, c, m, n_pad):
  """Official FIFO push (§6.5): the top Bt rows of `live(Q) ++ c[:m] ++ pads` by (is_real,
  recency), right-aligned and chronological.

  Args:
    Q: `[B, Bt, d]` with `n_temp` `[B]` live rows and flags `is_pad` `[B, Bt]`. c: `[B, nb, d]`:
    rows `< m` are real compression outputs, rows `[m, m + n_pad)` pad memories (m, n_pad `[B]`).

  Returns:
    (Q `[B, Bt, d]`, n_temp `[B]`, is_pad `[B, Bt]`). So all real rows are kept while fewer than
    Bt exist, topped up with the newest pads; beyond that only the newest Bt real rows.
  """
  bt, nb = Q.shape[1], c.shape[1]
  m, n_pad = m.astype(jnp.int32)[:, None], n_pad.astype(jnp.int32)[:, None]
  i, k = jnp.arange(bt, dtype=jnp.int32), jnp.arange(nb, dtype=jnp.int32)
  live = jnp.concatenate([i >= bt - n_temp[:, None], k < m + n_pad], axis=1)  # [B, Bt + nb]
  pad = live & jnp.concatenate([is_pad, jnp.broadcast_to(k >= m, c.shape[:2])], axis=1)
  real = live & ~pad
  n_real = jnp.sum(real, axis=1, keepdims=True, dtype=jnp.int32)
  kept = (real & (_rows_after(real) < bt)) | (pad & (_rows_after(pad) < bt - n_real))
  slot = jnp.where(kept, bt - 1 - _rows_after(kept), bt)                     # bt: not kept
  rows = jnp.arange(bt + nb, dtype=jnp.int32)
  scatter = lambda s: jnp.full((bt,), bt + nb, jnp.int32).at[s].set(rows, mode="drop")
  src = jax.vmap(scatter)(slot)                                              # [B, Bt]; bt+nb: dead
  new_Q = _gather_rows(jnp.concatenate([Q, c.astype(Q.dtype)], axis=1), src)
  new_pad = jnp.take_along_axis(pad, src, axis=1, mode="fill", fill_value=False)
  return new_Q, jnp.sum(kept, axis=1, dtype=jnp.int32), new_pad


def push_fifo(Q, n_temp, c, m):
  """Clean FIFO push: `keep_last_Bt(live(Q) ++ c[:m])`, right-aligned and chronological.

  Q: `[B, Bt, d]` with `n_temp` `[B]` live rows; c: `[B, nb, d]` with `m` `[B]` valid rows.
  Returns (Q `[B, Bt, d]`, n_temp `[B]`): `push_queue` without pads.
  """
  no_pads = jnp.zeros(Q.shape[:2], bool)
  Q, n_temp, _ = push_queue(Q, n_temp, no_pads, c, m, jnp.zeros_like(m))
  return Q, n_temp


def update_memory(y, memory: LayerMemory, global_net: GlobalMemoryNet | None,
                  temp_net: TempMemoryNet | None, readout_idx, comp_idx, n_comp, has_readout,
                  n_valid):
  """§7.2 memory update from the layer output.

  Args:
    y: `[B, L, d]` layer output. memory: carried state. global_net / temp_net: None when that path
    is off. readout_idx: `[B, G]`; comp_idx: `[B, nb]`; n_comp, has_readout, n_valid: `[B]`.

  Returns:
    (new LayerMemory, M `[B, G, d]` = RLA_g(S) in the state dtype). Rows with `has_readout` false
    keep S; rows with `n_valid == 0` (empty chunks) change nothing. With the official FIFO
    (`memory.is_pad` set), valid `comp_idx` entries past n_comp are pad memories (§6.5); the clean
    FIFO ignores them.
  """
  S, Q, n_temp, started, is_pad = memory
  if global_net is not None and S.shape[1]:
    new_S = global_net.update(_gather_rows(y, readout_idx), S, started)
    S = jnp.where(has_readout[:, None, None], new_S, S)
    M = global_net(S).astype(S.dtype)
  else:
    M = S
  if temp_net is not None and Q.shape[1]:
    c = temp_net(_gather_rows(y, comp_idx))
    if is_pad is None:
      Q, n_temp = push_fifo(Q, n_temp, c, n_comp)
    else:
      n_pad = jnp.sum(comp_idx < y.shape[1], axis=-1, dtype=jnp.int32) - n_comp
      Q, n_temp, is_pad = push_queue(Q, n_temp, is_pad, c, n_comp, n_pad)
  started = started | (n_valid > 0)
  return LayerMemory(S, Q, n_temp, started, is_pad), M


def update_memory_from_layout(y, memory, global_net, temp_net, layout):
  """`update_memory` with the index fields of a per-chunk `ChunkLayout` `[B, ...]`."""
  return update_memory(y, memory, global_net, temp_net, layout.readout_idx, layout.comp_idx,
                       layout.n_comp, layout.has_readout, layout.n_valid)

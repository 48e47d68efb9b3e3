"""CoMeT memory plug-in (spec §4, §7.1–7.2, §15.7, §15.8, §15.15) vs numpy list references."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.models.comet import (OFFICIAL_KEYS, GlobalMemoryNet, LayerMemory, LowRankAdapter,
                               TempMemoryNet, build_batch, inject_memory, memory_nets, push_fifo,
                               tiny_comet_config, update_memory_from_layout)

F64 = jnp.float64
D = 16


def _nets(config, seed=0, dim=D):
  return memory_nets(dim, config, param_dtype=F64, rngs=nnx.Rngs(seed))


def _batch(config, plans, rng):
  """Uniform ChunkLayout [B, N, ...] for examples with the given plans (padded to one length)."""
  examples = [(rng.integers(0, 200, sum(p)).tolist(), None, p) for p in plans]
  return build_batch(examples, config)


def _chunk(layout, t):
  return jax.tree.map(lambda a: jnp.asarray(a[:, t]), layout)


def _np(a):
  return np.asarray(a, np.float64)


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rla(x, rla):
  return x + x @ _np(rla.down_proj.kernel[...]) @ _np(rla.up_proj.kernel[...])


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


class _RefMemory:
  """List-based §7.2 reference for one batch row."""

  def __init__(self, global_net, temp_net, bt):
    self.g, self.t, self.bt = global_net, temp_net, bt
    self.S, self.Q, self.started = None, [], False

  def M(self):
    return _rla(self.S, self.g.o_proj)

  def inject(self, x, gslot, tslot):
    x = x.copy()
    if self.started:
      for j, p in enumerate(gslot):
        if p < len(x):
          x[p] = self.M()[j]
    for j, q in enumerate(self.Q):
      if tslot[j] < len(x):
        x[tslot[j]] = q
    return x

  def update(self, y, readout_idx, comp_idx, m, has_readout, n_valid):
    if has_readout:
      cand = _rms(y[readout_idx], _np(self.g.norm.weight[...]), self.g.norm.eps)
      if not self.started:
        self.S = cand
      else:
        g = _sigmoid(np.concatenate([cand, self.S], -1) @ _np(self.g.g_proj.kernel[...]))
        self.S = g * self.S + (1 - g) * cand
    for k in range(m):
      self.Q.append(_rla(_rms(y[comp_idx[k]], _np(self.t.norm.weight[...]), self.t.norm.eps),
                         self.t.rla))
    self.Q = self.Q[-self.bt:]
    self.started |= n_valid > 0


@pytest.mark.parametrize("gate", ["slot", "elementwise"])
def test_update_and_inject_match_list_reference(gate, rng):
  config = tiny_comet_config(gate=gate)
  global_net, temp_net = _nets(config, seed=int(rng.integers(1 << 30)))
  plans = [[16, 16, 16, 16], [10, 16, 14], [3, 5]]  # Bt overflow, partial chunks, empty chunks
  layout = _batch(config, plans, rng)
  B, N, L = layout.input_ids.shape
  G, Bt = config.global_mem_size, config.temp_capacity
  memory = LayerMemory.empty(B, G, Bt, D, F64)
  M = memory.S
  refs = [_RefMemory(global_net, temp_net, Bt) for _ in range(B)]
  step = nnx.jit(update_memory_from_layout)
  for t in range(N):
    lay = _chunk(layout, t)
    x = rng.standard_normal((B, L, D))
    x_in = inject_memory(jnp.asarray(x), memory, M, lay.gslot_idx, lay.tslot_idx)
    y = _np(x_in) + rng.standard_normal((B, L, D))
    memory, M = step(jnp.asarray(y), memory, global_net, temp_net, lay)
    for b, ref in enumerate(refs):
      np.testing.assert_allclose(_np(x_in[b]), ref.inject(x[b], layout.gslot_idx[b, t],
                                                          layout.tslot_idx[b, t]), rtol=1e-12)
      ref.update(y[b], layout.readout_idx[b, t], layout.comp_idx[b, t], layout.n_comp[b, t],
                 layout.has_readout[b, t], layout.n_valid[b, t])
      n = len(ref.Q)
      assert int(memory.n_temp[b]) == n and bool(memory.started[b]) == ref.started
      np.testing.assert_allclose(_np(memory.Q[b, Bt - n:]), np.array(ref.Q).reshape(n, D),
                                 rtol=1e-12, atol=1e-12)
      np.testing.assert_array_equal(_np(memory.Q[b, :Bt - n]), 0)
      np.testing.assert_allclose(_np(memory.S[b]), ref.S, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(_np(M[b]), ref.M(), rtol=1e-12, atol=1e-12)


def test_fifo_holds_last_tags_in_order(rng):
  """§15.7 on the full update path: RLA_t = identity, tag k at comp row k as [k, 1, 0, ...]."""
  config = tiny_comet_config()
  global_net, temp_net = _nets(config)
  temp_net.rla.up_proj.kernel[...] = jnp.zeros_like(temp_net.rla.up_proj.kernel[...])
  plans = [[16, 16, 16, 16], [1, 7, 16, 4], [5, 5]]
  layout = _batch(config, plans, rng)
  B, N, L = layout.input_ids.shape
  Bt = config.temp_capacity
  memory = LayerMemory.empty(B, config.global_mem_size, Bt, D, F64)
  tags = [[] for _ in range(B)]
  next_tag = 1
  for t in range(N):
    y = rng.standard_normal((B, L, D))
    for b in range(B):
      for k in range(layout.n_comp[b, t]):
        y[b, layout.comp_idx[b, t, k], :2] = [next_tag, 1.0]
        y[b, layout.comp_idx[b, t, k], 2:] = 0
        tags[b].append(next_tag)
        next_tag += 1
    memory, _ = update_memory_from_layout(jnp.asarray(y), memory, global_net, temp_net,
                                          _chunk(layout, t))
    Q = _np(memory.Q)
    for b in range(B):
      want = tags[b][-Bt:]
      n = len(want)
      assert int(memory.n_temp[b]) == n
      np.testing.assert_allclose(Q[b, Bt - n:, 0] / Q[b, Bt - n:, 1], want, rtol=1e-12)
  assert max(map(len, tags)) > Bt  # overflow exercised


def test_push_fifo_per_row_counts(rng):
  Bt, nb = 5, 3
  Q, n = jnp.zeros((2, Bt, 1), F64), jnp.zeros((2,), jnp.int32)
  hist, tag = [[], []], 1
  for _ in range(6):
    m = rng.integers(0, nb + 1, 2)
    c = np.zeros((2, nb, 1))
    for b in range(2):
      for k in range(m[b]):
        c[b, k, 0] = tag
        hist[b].append(tag)
        tag += 1
      c[b, m[b]:, 0] = -1  # invalid rows must never enter the FIFO
    Q, n = push_fifo(Q, n, jnp.asarray(c), jnp.asarray(m, jnp.int32))
    for b in range(2):
      want = hist[b][-Bt:]
      np.testing.assert_array_equal(_np(Q[b, :, 0]), [0] * (Bt - len(want)) + want)
      assert int(n[b]) == len(want)


class _Idx(NamedTuple):
  """The ChunkLayout index fields that update_memory reads."""
  readout_idx: jax.Array
  comp_idx: jax.Array
  n_comp: jax.Array
  has_readout: jax.Array
  n_valid: jax.Array


def _run_global(global_net, R):
  """Feeds readouts R [T, B, G, d] through update_memory (readouts at rows 0..G-1) → S per step."""
  T, B, G, d = R.shape
  memory = LayerMemory.empty(B, G, 0, d, F64)
  idx = jnp.broadcast_to(jnp.arange(G, dtype=jnp.int32), (B, G))
  ones = jnp.ones((B,), bool)
  out = []
  for t in range(T):
    memory, _ = update_memory_from_layout(
        jnp.asarray(R[t]), memory, global_net, None,
        _Idx(idx, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B,), jnp.int32), ones,
             jnp.full((B,), G, jnp.int32)))
    out.append(_np(memory.S))
  return out


@pytest.mark.parametrize("gate", ["slot", "elementwise"])
def test_gate_semantics(gate, rng):
  """§15.8: w_gate = 0 → running average with weight ½; huge logit → frozen; chunk 0 exact."""
  config = tiny_comet_config(gate=gate)
  global_net, _ = _nets(config)
  global_net.norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, D))
  R = rng.standard_normal((4, 2, config.global_mem_size, D))
  cands = [_np(global_net.norm(jnp.asarray(r))) for r in R]

  S = _run_global(global_net, R)
  np.testing.assert_array_equal(S[0], cands[0])  # exact at chunk 0

  global_net.g_proj.kernel[...] = jnp.zeros_like(global_net.g_proj.kernel[...])
  S, avg = _run_global(global_net, R), cands[0]
  for t in range(1, 4):
    avg = 0.5 * avg + 0.5 * cands[t]
    np.testing.assert_allclose(S[t], avg, rtol=1e-12, atol=1e-14)

  global_net.gate_offset = 1e4
  for s in _run_global(global_net, R):
    np.testing.assert_array_equal(s, cands[0])


def test_inject_overwrites_slots_and_drops_invalid(rng):
  B, L, G, Bt = 3, 12, 2, 4
  x = rng.standard_normal((B, L, D))
  Q, M = rng.standard_normal((B, Bt, D)), rng.standard_normal((B, G, D))
  n_temp = np.array([0, 2, 4], np.int32)
  started = np.array([False, True, True])
  gslot = np.array([[L, L], [0, 1], [L, 1]], np.int32)  # row 2: one invalid global index
  tslot = np.array([[L] * 4, [2, 3, L, L], [3, 4, 5, L]], np.int32)  # row 2: entry 3 invalid
  memory = LayerMemory(jnp.zeros((B, G, D), F64), jnp.asarray(Q), jnp.asarray(n_temp),
                       jnp.asarray(started))
  out = _np(inject_memory(jnp.asarray(x), memory, jnp.asarray(M), jnp.asarray(gslot),
                          jnp.asarray(tslot)))
  want = x.copy()
  want[1, [0, 1]] = M[1]
  want[1, [2, 3]] = Q[1, 2:]
  want[2, 1] = M[2, 1]
  want[2, [3, 4, 5]] = Q[2, :3]
  np.testing.assert_array_equal(out, want)


def test_init_sanity(rng):
  """§15.15: ‖RLA(x)−x‖/‖x‖ ≈ 0.02²·√(8d); gate logits std ≈ 0.02·√(2d), gates around 0.5."""
  d = 256
  config = tiny_comet_config()
  global_net, temp_net = _nets(config, seed=int(rng.integers(1 << 30)), dim=d)
  x = jnp.asarray(rng.standard_normal((512, d)))
  for rla in (global_net.o_proj, temp_net.rla):
    ratio = float(jnp.linalg.norm(rla(x) - x) / jnp.linalg.norm(x))
    assert 1 / 1.5 < ratio / (0.02**2 * np.sqrt(8 * d)) < 1.5
  for net in (global_net, temp_net):
    np.testing.assert_array_equal(_np(net.norm.weight[...]), 1)
  unit = lambda a: _np(global_net.norm(jnp.asarray(a)))
  logits = _np(global_net.gate_logits(jnp.asarray(unit(rng.standard_normal((4096, d)))),
                                      jnp.asarray(unit(rng.standard_normal((4096, d))))))
  assert 1 / 1.5 < logits.std() / (0.02 * np.sqrt(2 * d)) < 1.5
  assert abs(_sigmoid(logits).mean() - 0.5) < 0.1
  assert global_net.norm.eps == config.eps_global_norm and temp_net.norm.eps == 1e-12


def test_param_names_map_to_official_keys():
  config = tiny_comet_config()
  global_net, temp_net = _nets(config)
  shapes = {}
  for prefix, net in (("global_memory_net", global_net), ("temp_memory_net", temp_net)):
    for path, p in nnx.to_flat_state(nnx.state(net, nnx.Param)):
      shapes[".".join([prefix, *map(str, path)])] = p[...].shape
  assert set(shapes) == set(OFFICIAL_KEYS)
  assert shapes["global_memory_net.g_proj.kernel"] == (2 * D, 1)
  assert sum(np.prod(s) for s in shapes.values()) == 36 * D  # §4: 36·d per layer
  assert isinstance(global_net, GlobalMemoryNet) and isinstance(temp_net, TempMemoryNet)
  assert isinstance(global_net.o_proj, LowRankAdapter)

"""Tests of `dlax.ops.ssd` (Mamba-2 SSD / scalar-gated linear attention)."""

from __future__ import annotations

import numpy as np

from _acceptance import OpAcceptance
from _helpers import OpSpec
from dlax.ops import ssd, ssd_step


def naive_recurrent_simple_gla(q, k, v, g, scale=None, initial_state=None):
  """float64 numpy mirror of fla's `naive_recurrent_simple_gla` ([B, T, H, D] layout)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  state = np.zeros((b, h, dk, dv)) if initial_state is None else initial_state.copy()
  o = np.zeros((b, t, h, dv))
  for i in range(t):
    state = state * np.exp(g[:, i])[:, :, None, None] + k[:, i, :, :, None] * v[:, i, :, None, :]
    o[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i] * scale, state)
  return o, state


class TestSSD(OpAcceptance):
  spec = OpSpec("ssd", ssd, ssd_step, has_beta=False)

  def numpy_reference(self, x, initial_state):
    return naive_recurrent_simple_gla(x.q, x.k, x.v, x.g, initial_state=initial_state)

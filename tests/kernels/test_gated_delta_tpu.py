"""Tests of the Mosaic TPU Gated DeltaNet kernel `dlax_kernels.gated_delta_tpu` in TPU interpret
mode: the shared `TpuKernelSuite` (outputs and the gradients of q, k, v, g, beta and the initial
state against the float64 recurrent reference, bf16, lowering for TPU, input errors), and compiled
on a TPU when one is present."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_ssd_tpu import (Case, KernelSpec, TpuKernelSuite, _grad_names, assert_close,
                          outputs_and_grads, random_inputs, random_state, seed_of)

from dlax import ops
from dlax_kernels import gated_delta_tpu


class TestGatedDeltaTpu(TpuKernelSuite):
  spec = KernelSpec("gated_delta", gated_delta_tpu.gated_delta, ops.gated_delta, has_beta=True)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestGatedDeltaCompiledOnTpu:
  """Compiled Mosaic kernel at realistic shapes vs the XLA chunked path at highest precision."""

  @pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
  @pytest.mark.parametrize("dv", [64, 128])
  def test_matches_xla(self, rng, dtype, rtol, dv):
    case = Case(2, 1000, 4, 128, dv, chunk=64, scale=128 ** -0.5)
    x = random_inputs(rng, case.b, case.t, case.h, case.dk, case.dv, with_beta=True, dtype=dtype)
    s0 = random_state(rng, case.b, case.h, case.dk, case.dv, jnp.float32)
    seed = seed_of(rng)

    def run(impl):
      def fn(*args, initial_state):
        return ops.gated_delta(*args, scale=case.scale, chunk_size=case.chunk,
                               initial_state=initial_state, impl=impl)
      with jax.default_matmul_precision("highest"):
        return outputs_and_grads(fn, x, s0, np.random.default_rng(seed))

    names = _grad_names(TestGatedDeltaTpu.spec, True)
    for name, a, e in zip(names, run("pallas_tpu"), run("chunked")):
      assert_close(a, e, rtol, f"{name} seed={seed}")

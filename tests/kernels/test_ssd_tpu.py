"""Tests of the Mosaic TPU SSD kernel `dlax_kernels.ssd_tpu` in TPU interpret mode (race detection,
NaN-filled uninitialised memory): outputs, final states and the gradients of every input
(cotangents on both outputs) against the op's float64 recurrent reference; lowering of the
compiled path for TPU (`jax.export`); compiled on a TPU when one is present.

`TpuKernelSuite` is shared with `test_gated_delta_tpu.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import Inputs, assert_close, random_inputs, random_state, seed_of

from dlax import ops
from dlax_kernels import _tpu_chunks, ssd_tpu


class Case(NamedTuple):
  b: int
  t: int
  h: int
  dk: int
  dv: int
  chunk: int = 16
  with_state: bool = True
  scale: float = 0.5
  block_v: int | None = None


CASES = {
    "T_lt_C": Case(1, 5, 2, 8, 8, with_state=False),
    "T_not_multiple_of_C_two_value_blocks": Case(2, 37, 2, 8, 16, block_v=8),
    "five_chunks_Dk_ne_Dv": Case(1, 80, 2, 16, 8, scale=1.0),
}
BF16_CASE = Case(1, 37, 2, 16, 16)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  name: str
  kernel: Callable              # dlax_kernels.<op>_tpu.<op>
  op: Callable                  # dlax.ops.<op>
  has_beta: bool


def _grad_names(spec: KernelSpec, with_state: bool) -> list[str]:
  names = ["q", "k", "v", "g"] + ["beta"] * spec.has_beta
  return ["o", "final_state"] + [f"d{n}" for n in names] + ["dinitial_state"] * with_state


def outputs_and_grads(fn, x: Inputs, s0, rng) -> list:
  """Leaves of ((o, final), vjp((do, dfinal))) of `fn(*x.args(), initial_state)`, jitted; random
  cotangents on both outputs, in the outputs' dtypes."""
  b, _, h, dk = x.q.shape
  dv = x.v.shape[-1]
  do = rng.standard_normal(x.v.shape)
  dfinal = rng.standard_normal((b, h, dk, dv))

  @jax.jit
  def run(args, s0):
    if s0 is None:
      outs, vjp = jax.vjp(lambda a: fn(*a, initial_state=None), args)
    else:
      outs, vjp = jax.vjp(lambda a, s: fn(*a, initial_state=s), args, s0)
    o, final = outs
    return outs, vjp((jnp.asarray(do, o.dtype), jnp.asarray(dfinal, final.dtype)))

  return jax.tree.leaves(run(x.args(), s0))


class TpuKernelSuite:
  """Interpret-mode acceptance of one TPU kernel (set `spec`)."""

  spec: KernelSpec

  def inputs(self, rng, case: Case, dtype):
    x = random_inputs(rng, case.b, case.t, case.h, case.dk, case.dv, with_beta=self.spec.has_beta,
                      dtype=dtype)
    s0 = (random_state(rng, case.b, case.h, case.dk, case.dv, jnp.float32) if case.with_state
          else None)
    return x, s0

  def reference(self, x: Inputs, s0, case: Case, rng):
    """Float64 recurrent oracle on the same (upcast) inputs and cotangents."""
    def fn(*args, initial_state):
      return self.spec.op(*args, scale=case.scale, initial_state=initial_state, impl="recurrent")
    s0 = None if s0 is None else s0.astype(jnp.float64)
    return outputs_and_grads(fn, x.astype(jnp.float64), s0, rng)

  def kernel(self, x: Inputs, s0, case: Case, rng, **kwargs):
    def fn(*args, initial_state):
      return self.spec.kernel(*args, scale=case.scale, chunk_size=case.chunk,
                              initial_state=initial_state, block_v=case.block_v, **kwargs)
    return outputs_and_grads(fn, x, s0, rng)

  def check(self, rng, case: Case, dtype, rtol: float, kernel=None):
    """Kernel (default: `self.kernel`) vs the reference: outputs and all gradients."""
    x, s0 = self.inputs(rng, case, dtype)
    seed = seed_of(rng)
    actual = (kernel or self.kernel)(x, s0, case, np.random.default_rng(seed))
    expected = self.reference(x, s0, case, np.random.default_rng(seed))
    names = _grad_names(self.spec, case.with_state)
    assert len(actual) == len(expected) == len(names)
    assert actual[0].dtype == dtype and actual[1].dtype == jnp.float32
    for name, a, e in zip(names, actual, expected):
      assert_close(a, e, rtol, f"{self.spec.name} {name} {case} seed={seed}")

  @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
  def test_fp32_matches_recurrent(self, rng, case):
    self.check(rng, case, jnp.float32, 1e-5)

  def test_bf16_inputs(self, rng):
    self.check(rng, BF16_CASE, jnp.bfloat16, 1e-2)

  def test_public_op(self, rng):
    """`dlax.ops.<op>(..., impl="pallas_tpu")` dispatches to the kernel."""
    case = Case(1, 21, 1, 8, 8)

    def through_op(x, s0, case, rng):
      def fn(*args, initial_state):
        return self.spec.op(*args, scale=case.scale, chunk_size=case.chunk,
                            initial_state=initial_state, impl="pallas_tpu")
      return outputs_and_grads(fn, x, s0, rng)

    self.check(rng, case, jnp.float32, 1e-5, kernel=through_op)

  def test_padded_head_dims(self, rng, monkeypatch):
    """Compiled mode zero-pads head dims to 128 lanes; here to 16 in interpret mode (Dk = 8,
    Dv = 12), one value block of 16."""
    make_setup = _tpu_chunks.make_setup
    monkeypatch.setattr(_tpu_chunks, "make_setup", lambda *a, **kw: dataclasses.replace(
        make_setup(*a, **kw), head_multiple=16, block_v=16))
    self.check(rng, Case(1, 19, 1, 8, 12), jnp.float32, 1e-5)

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
  def test_lowers_for_tpu(self, dtype):
    """The compiled path (C = 64, Dk = 128, Dv = 64 padded to 128) lowers to three Mosaic custom
    calls (forward, states, reverse pass) with `jax.export` for TPU. Mosaic's own compiler passes
    run only on a TPU, so this checks JAX's Pallas-to-Mosaic lowering, not the TPU compile."""
    b, t, h, dk, dv = 2, 200, 2, 128, 64
    shape = jax.ShapeDtypeStruct
    args = [shape((b, t, h, dk), dtype), shape((b, t, h, dk), dtype), shape((b, t, h, dv), dtype),
            shape((b, t, h), jnp.float32)] + [shape((b, t, h), jnp.float32)] * self.spec.has_beta

    def loss(args, s0):
      o, final = self.spec.kernel(*args, scale=dk ** -0.5, chunk_size=64, initial_state=s0,
                                  interpret=False)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    module = jax.export.export(step, platforms=["tpu"])(args, shape((b, h, dk, dv), jnp.float32))
    text = module.mlir_module()
    assert text.count("tpu_custom_call") == 3
    for name in ("forward", "states", "backward"):
      assert f"{self.spec.name}_{name}" in text

  def bad_call(self, rng, dtype=jnp.float32, **kwargs):
    x, _ = self.inputs(rng, Case(1, 7, 1, 4, 4), dtype)
    kwargs = {"scale": 1.0, "chunk_size": 16} | kwargs
    return self.spec.kernel(*x.args(), **kwargs)

  @pytest.mark.parametrize("chunk_size", [8, 48, 512])
  def test_compiled_chunk_size_raises(self, rng, chunk_size):
    with pytest.raises(ValueError, match=rf"{self.spec.name}: the compiled TPU kernel needs "
                       rf"chunk_size in \(16, 32, 64, 128, 256\), got {chunk_size}"):
      self.bad_call(rng, chunk_size=chunk_size, interpret=False)

  def test_float64_raises(self, rng):
    with pytest.raises(ValueError, match=f"{self.spec.name}: the TPU kernel takes float32 or "
                       "bfloat16 q, k, v, got float64"):
      self.bad_call(rng, jnp.float64)

  def test_block_v_must_divide_dv(self, rng):
    with pytest.raises(ValueError, match=f"{self.spec.name}: block_v=3 must divide the value "
                       "width 4"):
      self.bad_call(rng, block_v=3)


class TestSSDTpu(TpuKernelSuite):
  spec = KernelSpec("ssd", ssd_tpu.ssd, ops.ssd, has_beta=False)


@pytest.mark.parametrize("device_kind, generation, block_v", [
    ("TPU v4", "v4", 128), ("TPU v5 lite", "v5e", 128), ("TPU v5e", "v5e", 128),
    ("TPU v5p", "v5p", 128), ("TPU v6 lite", "v6e", 256), ("TPU v6e", "v6e", 256),
    ("TPU7x", "v7", 256), ("cpu", None, 128)])
def test_blocks_per_generation(device_kind, generation, block_v):
  assert _tpu_chunks.generation(device_kind) == generation
  assert _tpu_chunks.blocks_for(device_kind).block_v == block_v


def test_compiled_setup_pads_heads_and_picks_value_blocks(rng):
  """Off TPU the compiled setup uses the default blocks: heads padded to 128 lanes, bv = 128."""
  x = random_inputs(rng, 1, 4, 1, 64, 200, with_beta=False, dtype=jnp.bfloat16)
  setup = _tpu_chunks.make_setup("ssd", x.q, x.k, x.v, scale=1.0, chunk_size=64,
                                 interpret=False, block_v=None)
  assert (setup.head_multiple, setup.block_v, setup.dtype) == (128, 128, jnp.bfloat16)
  assert setup.compiler_params().dimension_semantics == ("parallel",) * 3 + ("arbitrary",)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestSSDCompiledOnTpu:
  """Compiled Mosaic kernel at realistic shapes vs the XLA chunked path at highest precision."""

  @pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
  @pytest.mark.parametrize("dv", [64, 128])
  def test_matches_xla(self, rng, dtype, rtol, dv):
    case = Case(2, 1000, 4, 128, dv, chunk=64, scale=128 ** -0.5)
    x = random_inputs(rng, case.b, case.t, case.h, case.dk, case.dv, with_beta=False, dtype=dtype)
    s0 = random_state(rng, case.b, case.h, case.dk, case.dv, jnp.float32)
    seed = seed_of(rng)

    def run(impl):
      def fn(*args, initial_state):
        return ops.ssd(*args, scale=case.scale, chunk_size=case.chunk,
                       initial_state=initial_state, impl=impl)
      with jax.default_matmul_precision("highest"):
        return outputs_and_grads(fn, x, s0, np.random.default_rng(seed))

    for name, a, e in zip(_grad_names(TestSSDTpu.spec, True), run("pallas_tpu"), run("chunked")):
      assert_close(a, e, rtol, f"{name} seed={seed}")

"""Tests of the Mosaic TPU DLA kernels `dlax_kernels.dla_tpu`, mostly through the public op
`dla_attention(..., impl="pallas_tpu")`, in TPU interpret mode (race detection, NaN-filled
uninitialised memory): outputs, final caches, decisions and the gradients of q, k, v, g, λ, β and
the initial slot states (cotangents on o and the final slot states) against the op's float64
recurrent reference (spec dla.md §4.6); lowering of the compiled path for TPU (`jax.export`);
error messages. Shapes are tiny (interpret mode is slow); the inputs, cases and assertions are
those of `test_dla_triton.py` (piecewise-stationary inputs, so multi-token blocks, boundaries
and capacity merges all occur).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from _helpers import seed_of
from dlax.ops import DLACache, DLADecisions
from dlax_kernels import _tpu_chunks, dla_tpu
from _helpers import assert_close
from dla_kernel_cases import (OPTIONS, Case, assert_grads_close, assert_runs_close,
                              assert_same_decisions, cache_or_empty, op_options, run_op,
                              run_op_grads, setup, total_merges)

IMPL = "pallas_tpu"


def _to_float32(cache):
  return None if cache is None else jax.tree.map(
      lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, cache)


def _cotangents(rng, case: Case, cache):
  return (jnp.asarray(rng.standard_normal((case.b, case.t, case.h, case.dv)), jnp.float64),
          jnp.asarray(rng.standard_normal(cache.S.shape), jnp.float64))


# ---------------------------------------------------------------------------------------------
# Forward: decisions, outputs and caches.

FORWARD_CASES = {
    "mamba2_open_T_not_multiple_of_C": Case("mamba2", 37, 8, 3, 3, 0.5, h=1),
    "gdn_total_T_lt_C": Case("gdn", 13, 16, 4, 2, 0.3, "total", h=1),
    "gdn_open_K2_prefix_segments": Case("gdn", 45, 8, 2, 2, 0.6, prefix=7, segments=True, h=1),
    "mamba2_total_prefix_segments": Case("mamba2", 40, 16, 4, 3, 0.6, "total", prefix=7,
                                         segments=True, h=1),
}


@pytest.mark.parametrize("case", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_forward_float64_equals_recurrent(rng, case):
  """The algorithm: in float64 (interpret mode) the kernels equal the oracle to 1e-10, with the
  decisions and the integer cache fields exact."""
  inputs, _, cache, seg = setup(rng, case, jnp.float64)
  run_ref = run_op(inputs, cache, seg, None, **op_options(case, "recurrent"))
  run = run_op(inputs, cache, seg, None, **op_options(case, IMPL))
  assert total_merges(run_ref[2]) > 0
  assert_runs_close(run, run_ref, 1e-10, f"seed={seed_of(rng)}")


def test_forward_float32_own_decisions(rng):
  """fp32 kernels deciding for themselves vs the float64 oracle on the same fp32 values: same
  decisions, 1e-5."""
  case = Case("gdn", 41, 8, 4, 3, 0.5, prefix=9, segments=True, h=1)
  inputs, ref, cache, seg = setup(rng, case, jnp.float32)
  run_ref = run_op(ref, cache, seg, None, **op_options(case, "recurrent"))
  run = run_op(inputs, _to_float32(cache), seg, None, **op_options(case, IMPL))
  assert run[0].dtype == jnp.float32 and run[1].S.dtype == jnp.float32
  assert total_merges(run_ref[2]) > 0
  assert_runs_close(run, run_ref, 1e-5, f"seed={seed_of(rng)}")


# ---------------------------------------------------------------------------------------------
# Gradients (decisions frozen: injected from the reference run, so both follow one partition).

GRAD_CASES = {
    # 5 chunks in checkpoint groups of 2, 2, 1; Dk 8 -> 16 and Dv 16 padded as compiled mode
    # pads to 128 lanes, in two value blocks of 8.
    "mamba2_prefix_remat2_padded_heads_two_value_blocks": Case(
        "mamba2", 37, 8, 3, 2, 0.5, prefix=9, remat=2, b=1),
    # 5 chunks in one partial group of 8 (recompute and reverse steps past the end are no-ops).
    "gdn_prefix_segments_remat8": Case("gdn", 37, 8, 3, 3, 0.5, prefix=9, segments=True, b=1),
}


def _padded_blocks(monkeypatch) -> list:
  """Makes the interpreted setup pad head dims to 16 and use value blocks of 8; returns the list
  of setups made."""
  make_setup, made = dla_tpu.make_setup, []

  def padded(*args, **kwargs):
    made.append(dataclasses.replace(make_setup(*args, **kwargs), head_multiple=16, block_v=8))
    return made[-1]

  monkeypatch.setattr(dla_tpu, "make_setup", padded)
  return made


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_float32(rng, case, monkeypatch):
  """d/d(q, k, v, g, λ, β, S0) of `Σ o·W + Σ S_final·W′` in fp32 vs the float64 oracle."""
  inputs, ref, cache, seg = setup(rng, case, jnp.float32)
  cache = cache_or_empty(cache, case, jnp.float64)
  cot = _cotangents(rng, case, cache)
  run_ref, grads_ref = run_op_grads(ref, cache, seg, None, cot, **op_options(case, "recurrent"))
  decisions = run_ref[2]
  assert total_merges(decisions) > 0
  kernel_grads, padded = run_op_grads, None
  if case.remat == 2:
    padded = _padded_blocks(monkeypatch)
    kernel_grads = jax.jit(run_op_grads.__wrapped__, static_argnames=OPTIONS)   # fresh trace
  run, grads = kernel_grads(inputs, _to_float32(cache), seg, decisions, cot,
                            **op_options(case, IMPL))
  assert padded is None or padded
  msg = f"seed={seed_of(rng)}"
  assert_runs_close(run, run_ref, 1e-5, msg)
  assert_grads_close(grads, grads_ref, cache, case.capacity, 1e-5, msg)


def test_bfloat16_with_injected_decisions(rng):
  """bf16 inputs with the float64 decisions injected (rounding near τ cannot flip a boundary):
  outputs and gradients within bf16 tolerance of the oracle on the same rounded inputs."""
  case = Case("gdn", 33, 16, 3, 2, 0.5, prefix=6, b=1)
  inputs, ref, cache, _ = setup(rng, case, jnp.bfloat16)
  cot = _cotangents(rng, case, cache)
  run_ref, grads_ref = run_op_grads(ref, cache, None, None, cot, **op_options(case, "recurrent"))
  assert total_merges(run_ref[2]) > 0
  run, grads = run_op_grads(inputs, cache, None, run_ref[2], cot, **op_options(case, IMPL))
  msg = f"seed={seed_of(rng)}"
  assert run[0].dtype == jnp.bfloat16
  assert_same_decisions(run[2], run_ref[2], msg)
  assert_close(run[0], run_ref[0], 1e-2, f"{msg} o")
  assert_grads_close(grads, grads_ref, cache, case.capacity, 1e-2, msg)


# ---------------------------------------------------------------------------------------------
# The compiled path: lowering for TPU, blocks per generation.


@pytest.mark.parametrize("backbone, score_ref, dtype", [
    ("gdn", "open", jnp.bfloat16), ("mamba2", "total", jnp.float32)])
def test_lowers_for_tpu(backbone, score_ref, dtype):
  """The compiled path (C = 64, K = 30, Dk = 128, Dv = 64 padded to 128, with segment resets and
  injected decisions) lowers to three Mosaic custom calls (bookkeeping, slot forward, slot
  backward) with `jax.export` for TPU. Mosaic's own compiler passes run only on a TPU, so this
  checks JAX's Pallas-to-Mosaic lowering, not the TPU compile."""
  b, t, h, dk, dv, capacity = 2, 200, 2, 128, 64, 30
  shape = jax.ShapeDtypeStruct
  args = [shape((b, t, h, dk), dtype), shape((b, t, h, dk), dtype), shape((b, t, h, dv), dtype),
          shape((b, t, h), jnp.float32), shape((b, t, h, 4), dtype),
          shape((b, t, h), dtype) if backbone == "gdn" else None]
  others = [shape((b, t), jnp.int32), shape((b, t, h), jnp.bool_), shape((b, t, h), jnp.int32)]

  def loss(args, segment_ids, boundary, merge_idx):
    decisions = DLADecisions(boundary, jnp.zeros(boundary.shape, jnp.float32), merge_idx,
                             merge_idx)
    o, cache, _ = dla_tpu.dla(*args, tau=0.6, capacity=capacity, chunk_size=64, scale=1.0,
                              score_ref=score_ref, segment_ids=segment_ids,
                              decisions=decisions, interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(cache.S)

  step = jax.jit(jax.value_and_grad(loss))
  text = jax.export.export(step, platforms=["tpu"])(args, *others).mlir_module()
  assert text.count("tpu_custom_call") == 3
  for name in ("bookkeeping", "slots_forward", "slots_backward"):
    assert f"dla_{name}" in text


@pytest.mark.parametrize("device_kind, block_v, group", [
    ("TPU v4", 128, 5), ("TPU v5 lite", 128, 8), ("TPU v5p", 128, 8), ("TPU v6e", 256, 8),
    ("TPU7x", 256, 8), ("cpu", 128, 5)])
def test_blocks_and_groups_per_generation(device_kind, block_v, group):
  """Value block and checkpoint group at K = 30, Dk = 128 (R + 1 slot stacks in 3/4 of VMEM)."""
  blocks = _tpu_chunks.blocks_for(device_kind)
  assert blocks.block_v == block_v
  assert dla_tpu.group_size(8, 30 * 128 * block_v * 4, blocks.vmem_limit_bytes) == group


def test_compiled_setup_pads_heads():
  """Off TPU the compiled setup uses the default blocks: heads padded to 128 lanes, bv = 128."""
  q = jnp.zeros((1, 4, 1, 64), jnp.bfloat16)
  v = jnp.zeros((1, 4, 1, 200), jnp.bfloat16)
  lam = jnp.zeros((1, 4, 1, 4), jnp.bfloat16)
  setup_ = dla_tpu.make_setup(q, q, v, lam, None, capacity=30, chunk_size=64, score_ref="open",
                              remat_every=8, interpret=False, block_v=None)
  assert (setup_.head_multiple, setup_.block_v, setup_.group, setup_.gdn) == (128, 128, 5, False)
  assert setup_.compiler_params(2).dimension_semantics == ("parallel",) * 2 + ("arbitrary",)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
class TestCompiledOnTpu:
  """Compiled Mosaic kernels at realistic shapes (B = 2, T = 1000, H = 4, Dk = 128, K = 30,
  C = 64) vs the XLA chunked path at highest precision, decisions injected from the XLA run."""

  @pytest.mark.parametrize("backbone", ["mamba2", "gdn"])
  @pytest.mark.parametrize("dv", [64, 128])
  @pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)],
                           ids=["float32", "bfloat16"])
  def test_realistic_shapes_match_xla(self, rng, backbone, dv, dtype, rtol):
    case = Case(backbone, 1000, 64, 30, 30, 0.6, b=2, h=4, dk=128, dv=dv)
    inputs, ref, _, _ = setup(rng, case, dtype)
    ref32 = tuple(None if a is None else a.astype(jnp.float32) for a in ref)
    cache = DLACache.empty(case.b, case.h, case.capacity, case.dk, case.dv, jnp.float32)
    cot = tuple(a.astype(jnp.float32) for a in _cotangents(rng, case, cache))
    with jax.default_matmul_precision("highest"):
      run_ref, grads_ref = run_op_grads(ref32, cache, None, None, cot, **op_options(case, "chunked"))
    run, grads = run_op_grads(inputs, cache, None, run_ref[2], cot, **op_options(case, IMPL))
    msg = f"{backbone} Dv={dv} {dtype.__name__} seed={seed_of(rng)}"
    assert_close(run[0], run_ref[0], rtol, f"{msg} o")
    assert_close(run[1].S, run_ref[1].S, rtol, f"{msg} S")
    assert_grads_close(grads, grads_ref, cache, case.capacity, rtol, msg)


# ---------------------------------------------------------------------------------------------
# Errors.

BAD = {  # name: (keyword overrides of the call, error pattern)
    "capacity": (dict(capacity=1), r"capacity must be an int >= 2, got 1"),
    "score_ref": (dict(score_ref="nope"), r"score_ref must be 'open' or 'total'"),
    "remat_every": (dict(remat_every=0), r"remat_every must be a positive int, got 0"),
    "compiled_chunk_size": (dict(chunk_size=48, interpret=False),
                            r"the compiled TPU kernels need chunk_size in \(16, 32, 64, 128, "
                            r"256\), got 48"),
    "compiled_dtype": (dict(dtype=jnp.float64, interpret=False),
                       r"the compiled TPU kernels take float32 or bfloat16 q, got float64"),
    "block_v": (dict(block_v=3), r"block_v=3 must divide the value width 4"),
    "vmem": (dict(capacity=2000, interpret=False), r"two slot stacks of .* do not fit"),
}


@pytest.mark.parametrize("name", BAD.keys())
def test_unsupported_inputs_raise(name):
  overrides, pattern = BAD[name]
  kwargs = dict(tau=0.5, capacity=3, chunk_size=16, scale=1.0) | overrides
  dtype = kwargs.pop("dtype", jnp.float32)
  q = jnp.zeros((1, 7, 1, 4), dtype)
  g = jnp.zeros((1, 7, 1), jnp.float32)
  lam = jnp.zeros((1, 7, 1, 2), dtype)
  with pytest.raises(ValueError, match=rf"dla \(pallas_tpu\): {pattern}"):
    dla_tpu.dla(q, q, q, g, lam, **kwargs)

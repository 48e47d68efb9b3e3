"""Shared helpers for the linear-attention ops: input checks, padding, decay segment sums.

Shape conventions (every op): q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g `[B, T, H]` (log-decay,
float32/float64), beta `[B, T, H]`, states `[B, H, Dk, Dv]`.
"""

from __future__ import annotations

import importlib
from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["chunked", "recurrent", "masked", "pallas_triton", "pallas_tpu"] | None
XLA_IMPLS: tuple[str, ...] = ("chunked", "recurrent", "masked")
# Pallas backends: `dlax_kernels.<op>_<suffix>.<op>` (pallas_call -> Triton, or Mosaic TPU).
KERNEL_IMPLS: dict[str, str] = {"pallas_triton": "triton", "pallas_tpu": "tpu"}
IMPLS: tuple[str, ...] = XLA_IMPLS + tuple(KERNEL_IMPLS)
PLATFORM_IMPLS: dict[str, str] = {"gpu": "pallas_triton", "tpu": "pallas_tpu"}
MAX_CHUNK_SIZE = 256


def accumulator_dtype(*arrays) -> jnp.dtype:
  """fp32 accumulators, or fp64 when any input is fp64 (reference runs under `jax_enable_x64`)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays if a is not None))


def _fail(op: str, message: str):
  raise ValueError(f"{op}: {message}")


def default_scale(q, scale: float | None) -> float:
  """fla's convention: `Dk ** -0.5` unless given."""
  return q.shape[-1] ** -0.5 if scale is None else float(scale)


def require_beta(op: str, beta) -> None:
  if beta is None:
    _fail(op, "beta ([B, T, H] write strength) is required; use ssd for the scalar-gated rule")


def check_impl(op: str, impl: str | None) -> None:
  if impl is not None and impl not in IMPLS:
    _fail(op, f"impl must be None or one of {IMPLS}, got {impl!r}")


def resolve_impl(op: str, impl: str | None, kernel_name: str | None = None) -> str:
  """`impl`, or for None the platform's kernel backend when the op has one (GPU: pallas_triton,
  TPU: pallas_tpu), else "chunked" (the XLA path, always available). `op` names the op in error
  messages, `kernel_name` (default `op`) its kernel modules."""
  check_impl(op, impl)
  if impl is not None:
    return impl
  platform_impl = PLATFORM_IMPLS.get(jax.default_backend())
  kernel_name = kernel_name or op
  if (platform_impl is not None
      and _kernel_module(kernel_name, platform_impl, required=False) is not None):
    return platform_impl
  return "chunked"


def _kernel_module(op: str, impl: str, *, required: bool):
  name = f"dlax_kernels.{op}_{KERNEL_IMPLS[impl]}"
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as error:
    if error.name != name:
      raise
    if required:
      raise NotImplementedError(f"{op}: no {impl} kernel ({name} does not exist); use "
                                "impl='chunked' (the XLA path)") from None
    return None


def kernel(op: str, impl: str):
  """The Pallas implementation `dlax_kernels.<op>_<triton|tpu>.<op>` of `op` for `impl`."""
  return getattr(_kernel_module(op, impl, required=True), op)


def check_chunk_size(op: str, chunk_size: int) -> None:
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
    _fail(op, f"chunk_size must be a Python int, got {type(chunk_size).__name__}")
  if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
    _fail(op, f"chunk_size must be in [1, {MAX_CHUNK_SIZE}], got {chunk_size}")


def check_log_decay(op: str, g, batch_shape: tuple[int, ...]) -> None:
  if not jnp.issubdtype(g.dtype, jnp.floating) or g.dtype not in (jnp.float32, jnp.float64):
    _fail(op, f"g (log-decay) must be float32 or float64, got {g.dtype}; keep decays in fp32")
  if g.shape != batch_shape:
    _fail(op, f"g must have shape {batch_shape} ([B, T, H]), got {g.shape}")


def check_inputs(op: str, q, k, v, g, beta=None, initial_state=None, *, step: bool = False) -> None:
  """Validates shapes and dtypes of a linear-attention call.

  Sequence ops take `[B, T, H, D]` tensors; step ops (`step=True`) take `[B, H, D]` tensors.
  """
  rank = 3 if step else 4
  layout = "[B, H, D]" if step else "[B, T, H, D]"
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != rank:
      _fail(op, f"{name} must have rank {rank} {layout}, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      _fail(op, f"{name} must be floating point, got {x.dtype}")
  if q.shape != k.shape:
    _fail(op, f"q and k must have the same shape, got {q.shape} and {k.shape}")
  if v.shape[:-1] != q.shape[:-1]:
    _fail(op, f"v must match q on {layout[:-4]}], got v {v.shape} and q {q.shape}")
  batch_shape = q.shape[:-1]
  check_log_decay(op, g, batch_shape)
  if beta is not None:
    if beta.shape != batch_shape:
      _fail(op, f"beta must have shape {batch_shape}, got {beta.shape}")
    if not jnp.issubdtype(beta.dtype, jnp.floating):
      _fail(op, f"beta must be floating point, got {beta.dtype}")
  if initial_state is not None:
    b, h, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    if initial_state.shape != (b, h, dk, dv):
      _fail(op, f"initial_state must have shape {(b, h, dk, dv)} ([B, H, Dk, Dv]), "
            f"got {initial_state.shape}")


def pad_time(x, multiple: int, axis: int = 1):
  """Zero-pads axis `axis` up to a multiple of `multiple` (g = 0, k = v = 0 is an identity step)."""
  if x is None:
    return None
  t = x.shape[axis]
  pad = -t % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def to_chunks(x, chunk_size: int):
  """`[B, T, ...]` with T a multiple of C -> `[N, B, C, ...]` (chunk axis first, for `lax.scan`)."""
  b, t = x.shape[:2]
  x = x.reshape(b, t // chunk_size, chunk_size, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def from_chunks(x):
  """Inverse of `to_chunks`: `[N, B, C, ...]` -> `[B, N*C, ...]`."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def segment_sum(g, axis: int = -1):
  """Masked segment sum of log-decays: `out[..., i, s] = sum_{r=s+1..i} g[..., r]` for s <= i, else -inf.

  Built by a masked cumulative sum (not a difference of two cumulative sums), so `exp(out)` is
  accurate even when the running sum is large. `g` has the time axis at `axis`; the two new
  trailing axes are (i, s).
  """
  g = jnp.moveaxis(g, axis, -1)
  t = g.shape[-1]
  x = jnp.broadcast_to(g[..., :, None], (*g.shape, t))          # x[..., r, s] = g_r
  strict = jnp.tril(jnp.ones((t, t), dtype=bool), k=-1)          # r > s
  x = jnp.where(strict, x, 0.0)
  out = jnp.cumsum(x, axis=-2)                                   # sum over r <= i of g_r [r > s]
  incl = jnp.tril(jnp.ones((t, t), dtype=bool))
  return jnp.where(incl, out, -jnp.inf)


def decay_matrix(g, axis: int = -1):
  """`Γ[..., i, s] = exp(sum_{r=s+1..i} g_r)` for s <= i, else 0."""
  return jnp.exp(segment_sum(g, axis))


def is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)

"""Mamba-2 mixer (ngroups = 1) on top of a `MultiStateCore`: SSD, Log-Linear Mamba-2 or DLA."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dlax.layers.conv import CausalConv1d
from dlax.layers.initializers import dense, dt_bias_init, state_dtype
from dlax.layers.multistate import (LAMBDA_INIT_STD, DLAConfig, LogLinearConfig,
                                    MultiStateCore, Multistate)
from dlax.layers.norms import GatedRMSNorm


class Mamba2Cache(NamedTuple):
  conv: jax.Array   # [B, W−1, d_in + 2N], the last conv inputs [x, B, C]
  ssm: Any          # the core's state: [B, H, N, P] fp32 (fp64 for fp64 compute), a
                    # LogLinearState or a DLACache (spec §5.3's DLALayerCache = (conv, DLACache))


class Mamba2Mixer(nnx.Module):
  """Mamba-2 mixer: `[B, T, d] -> [B, T, d]`.

  in_proj: d -> [z (d_in), x (d_in), B (N), C (N), dt (H), λ-logits (H·Kλ)], with d_in =
  expand·d, N = d_state, H = d_in / headdim and Kλ = 0 for `multistate="none"`. A causal conv
  (with bias) and SiLU act on [x, B, C]; then `Δ = softplus(dt + dt_bias)`, `g = −Δ·exp(A_log)`,
  `v = Δ·x`, `q = C`, `k = B` (shared by all heads) go through the core (scale 1: `ssd`,
  Log-Linear or DLA with `λ = softplus(L ⊙ logits)`); `y = o + D·x`, `y = RMSNorm(y ⊙ silu(z))`,
  out_proj. A_log, D and dt_bias are kept in fp32 (fp64 when param_dtype is fp64); the λ columns
  of in_proj are initialised with N(0, 0.006²).
  """

  def __init__(self, d_model: int, *, headdim: int = 64, d_state: int = 128, expand: int = 2,
               conv_kernel: int = 4, init_std: float = 0.02, norm_eps: float = 1e-6,
               chunk_size: int = 64, impl: str = "chunked", multistate: Multistate = "none",
               dla: DLAConfig | None = None, log_linear: LogLinearConfig | None = None,
               unit_lambda: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    d_inner = expand * d_model
    if d_inner % headdim:
      raise ValueError(f"Mamba2Mixer: d_inner = expand·d_model = {d_inner} is not divisible by "
                       f"headdim {headdim}")
    self.d_inner, self.d_state, self.headdim = d_inner, d_state, headdim
    self.num_heads = h = d_inner // headdim
    self.core = MultiStateCore(multistate, num_heads=h, chunk_size=chunk_size, impl=impl,
                               dla=dla, log_linear=log_linear, unit_lambda=unit_lambda,
                               param_dtype=param_dtype)
    kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    base_width = 2 * d_inner + 2 * d_state + h
    lam_width = h * self.core.num_lambda
    self.in_proj = dense(d_model, base_width + lam_width, **kw)
    if lam_width:
      w_lam = LAMBDA_INIT_STD * jax.random.normal(rngs.params(), (d_model, lam_width), param_dtype)
      self.in_proj.kernel[...] = self.in_proj.kernel[...].at[:, base_width:].set(w_lam)
    self.conv = CausalConv1d(d_inner + 2 * d_state, conv_kernel, use_bias=True,
                             param_dtype=param_dtype, rngs=rngs)
    f32 = state_dtype(param_dtype)
    self.A_log = nnx.Param(jnp.log(jnp.arange(1, h + 1, dtype=f32)))
    self.D = nnx.Param(jnp.ones((h,), f32))
    self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), (h,), f32))
    self.norm = GatedRMSNorm(d_inner, eps=norm_eps, param_dtype=param_dtype)
    self.out_proj = dense(d_inner, d_model, **kw)

  def init_cache(self, batch_size: int, max_len: int, dtype) -> Mamba2Cache:
    """Cache of a fresh sequence; `max_len` is unused (the state has a fixed size)."""
    del max_len
    conv_channels = self.d_inner + 2 * self.d_state
    return Mamba2Cache(
        conv=jnp.zeros((batch_size, self.conv.kernel_size - 1, conv_channels), dtype),
        ssm=self.core.init_state(batch_size, self.d_state, self.headdim, dtype))

  def __call__(self, x, *, cache: Mamba2Cache | None = None, pos=None,
               return_metrics: bool = False):
    """x `[B, T, d]` -> (y `[B, T, d]`, cache after this call), plus the core's metrics dict
    (`[H]` arrays; `{}` unless DLA) when `return_metrics`. `pos` is unused."""
    del pos
    b, t, _ = x.shape
    h, p, n = self.num_heads, self.headdim, self.d_state
    z, xbc, dt, lam_logits = jnp.split(
        self.in_proj(x), [self.d_inner, 2 * self.d_inner + 2 * n, 2 * self.d_inner + 2 * n + h],
        axis=-1)
    xbc, conv_state = self.conv(xbc, None if cache is None else cache.conv)
    xs, bs, cs = jnp.split(jax.nn.silu(xbc), [self.d_inner, self.d_inner + n], axis=-1)

    f32 = self.A_log.dtype
    delta = jax.nn.softplus(dt.astype(f32) + self.dt_bias[...])            # [B, T, H]
    g = -delta * jnp.exp(self.A_log[...])
    xs = xs.reshape(b, t, h, p)
    v = (xs.astype(f32) * delta[..., None]).astype(xs.dtype)
    q = jnp.broadcast_to(cs[:, :, None], (b, t, h, n))
    k = jnp.broadcast_to(bs[:, :, None], (b, t, h, n))
    o, state, *metrics = self.core(q, k, v, g, lam_logits, scale=1.0,
                                   state=None if cache is None else cache.ssm,
                                   return_metrics=return_metrics)
    y = o + (self.D[...][:, None] * xs).astype(o.dtype)
    y = self.norm(y.reshape(b, t, self.d_inner), z)
    return (self.out_proj(y), Mamba2Cache(conv=conv_state, ssm=state), *metrics)


class DLAMamba2(Mamba2Mixer):
  """Mamba-2 with the SSD core replaced by DLA (spec dla.md §8); `dla` sets K, Kλ, τ, the score."""

  def __init__(self, d_model: int, *, dla: DLAConfig | None = None, **kwargs):
    super().__init__(d_model, multistate="dla", dla=dla, **kwargs)


class LogLinearMamba2(Mamba2Mixer):
  """Mamba-2 with Log-Linear attention (spec dla.md §3); `log_linear` sets the λ levels."""

  def __init__(self, d_model: int, *, log_linear: LogLinearConfig | None = None, **kwargs):
    super().__init__(d_model, multistate="log_linear", log_linear=log_linear, **kwargs)

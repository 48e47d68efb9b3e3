"""Gated DeltaNet mixer on a `MultiStateCore`: the gated delta rule, Log-Linear GDN or DLA."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dlax.layers.conv import CausalConv1d
from dlax.layers.initializers import dense, dt_bias_init, state_dtype
from dlax.layers.multistate import (LAMBDA_INIT_STD, DLAConfig, LogLinearConfig,
                                    MultiStateCore, Multistate)
from dlax.layers.norms import RMSNorm


class GatedDeltaNetCache(NamedTuple):
  conv_q: jax.Array   # [B, W−1, H·Dk]
  conv_k: jax.Array   # [B, W−1, H·Dk]
  conv_v: jax.Array   # [B, W−1, H·Dv]
  state: Any          # the core's state: [B, H, Dk, Dv] fp32 (fp64 for fp64 compute), a
                      # LogLinearState or a DLACache (spec §5.3's DLALayerCache)


def l2_normalize(x, *, eps: float = 1e-6):
  """`x · rsqrt(Σx² + eps)` over the last axis, computed in at least fp32; returns x's dtype."""
  h = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return (h * jax.lax.rsqrt(jnp.sum(h * h, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class GatedDeltaNet(nnx.Module):
  """Gated DeltaNet mixer: `[B, T, d] -> [B, T, d]`.

  q, k, v projections (no bias), each followed by a causal conv (no bias) and SiLU; q and k are
  L2-normalised per head. `β = sigmoid(b_proj x)`, `g = −exp(A_log)·softplus(a_proj x + dt_bias)`
  (fp32), `o = core(q, k, v, g, β, scale=Dk^−½)` (`gated_delta`, Log-Linear or DLA with
  `λ = softplus(L ⊙ l_proj x)`, l_proj: d -> H·Kλ without bias, N(0, 0.006²)), then
  `o = RMSNorm_head(o) ⊙ silu(g_proj x)` and o_proj.

  Init: `A ~ U(1, 16)` (the reference's U(0, 16) with the lower end moved off 0 so log A is
  finite), `A_log = log A`; dt_bias as in Mamba-2. A_log and dt_bias are kept in fp32.
  """

  def __init__(self, d_model: int, *, num_heads: int = 6, head_dim_k: int = 192,
               head_dim_v: int = 384, conv_kernel: int = 4, init_std: float = 0.02,
               norm_eps: float = 1e-6, chunk_size: int = 64, impl: str = "chunked",
               multistate: Multistate = "none", dla: DLAConfig | None = None,
               log_linear: LogLinearConfig | None = None, unit_lambda: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    h, dk, dv = num_heads, head_dim_k, head_dim_v
    self.num_heads, self.head_dim_k, self.head_dim_v = h, dk, dv
    self.core = MultiStateCore(multistate, num_heads=h, chunk_size=chunk_size, impl=impl,
                               dla=dla, log_linear=log_linear, unit_lambda=unit_lambda,
                               param_dtype=param_dtype)
    kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = dense(d_model, h * dk, **kw)
    self.k_proj = dense(d_model, h * dk, **kw)
    self.v_proj = dense(d_model, h * dv, **kw)
    conv = lambda c: CausalConv1d(c, conv_kernel, use_bias=False, param_dtype=param_dtype,
                                  rngs=rngs)
    self.q_conv, self.k_conv, self.v_conv = conv(h * dk), conv(h * dk), conv(h * dv)
    self.a_proj = dense(d_model, h, **kw)
    self.b_proj = dense(d_model, h, **kw)
    self.g_proj = dense(d_model, h * dv, **kw)
    self.l_proj = (dense(d_model, h * self.core.num_lambda, **{**kw, "init_std": LAMBDA_INIT_STD})
                   if self.core.num_lambda else None)
    f32 = state_dtype(param_dtype)
    a = jax.random.uniform(rngs.params(), (h,), f32, minval=1.0, maxval=16.0)
    self.A_log = nnx.Param(jnp.log(a))
    self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), (h,), f32))
    self.o_norm = RMSNorm(dv, eps=norm_eps, param_dtype=param_dtype)
    self.o_proj = dense(h * dv, d_model, **kw)

  def init_cache(self, batch_size: int, max_len: int, dtype) -> GatedDeltaNetCache:
    """Cache of a fresh sequence; `max_len` is unused (the state has a fixed size)."""
    del max_len
    h, dk, dv = self.num_heads, self.head_dim_k, self.head_dim_v
    conv = lambda c: jnp.zeros((batch_size, self.q_conv.kernel_size - 1, c), dtype)
    return GatedDeltaNetCache(conv_q=conv(h * dk), conv_k=conv(h * dk), conv_v=conv(h * dv),
                              state=self.core.init_state(batch_size, dk, dv, dtype))

  def __call__(self, x, *, cache: GatedDeltaNetCache | None = None, pos=None,
               return_metrics: bool = False):
    """x `[B, T, d]` -> (y `[B, T, d]`, cache after this call), plus the core's metrics dict
    (`[H]` arrays; `{}` unless DLA) when `return_metrics`. `pos` is unused."""
    del pos
    b, t, _ = x.shape
    h, dk, dv = self.num_heads, self.head_dim_k, self.head_dim_v
    conv_states = (None, None, None) if cache is None else cache[:3]
    q, conv_q = self.q_conv(self.q_proj(x), conv_states[0])
    k, conv_k = self.k_conv(self.k_proj(x), conv_states[1])
    v, conv_v = self.v_conv(self.v_proj(x), conv_states[2])
    q = l2_normalize(jax.nn.silu(q).reshape(b, t, h, dk))
    k = l2_normalize(jax.nn.silu(k).reshape(b, t, h, dk))
    v = jax.nn.silu(v).reshape(b, t, h, dv)

    f32 = self.A_log.dtype
    beta = jax.nn.sigmoid(self.b_proj(x).astype(f32))                               # [B, T, H]
    g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(self.a_proj(x).astype(f32) + self.dt_bias[...])

    lam_logits = None if self.l_proj is None else self.l_proj(x)                   # [B, T, H·Kλ]
    o, state, *metrics = self.core(q, k, v, g, lam_logits, beta, scale=dk ** -0.5,
                                   state=None if cache is None else cache.state,
                                   return_metrics=return_metrics)
    gate = self.g_proj(x).reshape(b, t, h, dv)
    o = self.o_norm(o) * jax.nn.silu(gate)
    return (self.o_proj(o.reshape(b, t, h * dv)),
            GatedDeltaNetCache(conv_q, conv_k, conv_v, state), *metrics)


class DLAGatedDeltaNet(GatedDeltaNet):
  """Gated DeltaNet with DLA (spec dla.md §8); `dla` sets K, Kλ, τ and the score."""

  def __init__(self, d_model: int, *, dla: DLAConfig | None = None, **kwargs):
    super().__init__(d_model, multistate="dla", dla=dla, **kwargs)


class LogLinearGatedDeltaNet(GatedDeltaNet):
  """Gated DeltaNet with Log-Linear attention (spec dla.md §3); `log_linear` sets the λ levels."""

  def __init__(self, d_model: int, *, log_linear: LogLinearConfig | None = None, **kwargs):
    super().__init__(d_model, multistate="log_linear", log_linear=log_linear, **kwargs)

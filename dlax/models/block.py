"""One residual block: `x + mixer(norm(x))`, then `x + SwiGLU(norm(x))`."""

from __future__ import annotations

from flax import nnx

from dlax.layers import Attention, GatedDeltaNet, Mamba2Mixer, RMSNorm, SwiGLU
from dlax.models.config import ModelConfig


def make_mixer(config: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """The sequence mixer named by `config.mixer`, built from its sub-config."""
  common = dict(init_std=config.init_std, norm_eps=config.norm_eps, dtype=config.compute_dtype,
                param_dtype=config.params_dtype, rngs=rngs)
  recurrent = dict(chunk_size=config.chunk_size, impl=config.impl, multistate=config.multistate,
                   dla=config.dla, log_linear=config.log_linear)
  if config.mixer == "mamba2":
    c = config.mamba2
    return Mamba2Mixer(config.d_model, headdim=c.headdim, d_state=c.d_state, expand=c.expand,
                       conv_kernel=c.conv_kernel, **recurrent, **common)
  if config.mixer == "gated_delta":
    c = config.gated_delta
    return GatedDeltaNet(config.d_model, num_heads=c.num_heads, head_dim_k=c.head_dim_k,
                         head_dim_v=c.head_dim_v, conv_kernel=c.conv_kernel, **recurrent,
                         **common)
  c = config.attention
  return Attention(config.d_model, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                   head_dim=c.head_dim, rope_theta=c.rope_theta, qk_norm=c.qk_norm,
                   implementation=c.implementation, **common)


class Block(nnx.Module):
  """Pre-norm residual block: `__call__(x [B, T, d], *, cache, pos, return_metrics=False) ->
  (x, new mixer cache)`, plus the mixer's metrics dict when `return_metrics`."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(config.d_model, eps=config.norm_eps, param_dtype=config.params_dtype)
    self.mixer_norm = norm()
    self.mixer = make_mixer(config, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = SwiGLU(config.d_model, config.d_ff, init_std=config.init_std,
                      dtype=config.compute_dtype, param_dtype=config.params_dtype, rngs=rngs)

  def init_cache(self, batch_size: int, max_len: int, dtype):
    return self.mixer.init_cache(batch_size, max_len, dtype)

  def __call__(self, x, *, cache=None, pos=None, kv_mask=None, return_metrics: bool = False):
    """`kv_mask` (`[B, T]` bool, padding mask) is for attention mixers only."""
    masking = {} if kv_mask is None else dict(kv_mask=kv_mask)
    y, cache, *metrics = self.mixer(self.mixer_norm(x), cache=cache, pos=pos,
                                    return_metrics=return_metrics, **masking)
    x = x + y
    return (x + self.mlp(self.mlp_norm(x)), cache, *metrics)

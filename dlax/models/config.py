"""Model configurations (frozen dataclasses) and presets: tiny CPU models and the paper scale."""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from dlax.layers.multistate import MULTISTATE_MODES, DLAConfig, LogLinearConfig, Multistate
from dlax.ops.common import IMPLS, MAX_CHUNK_SIZE

MIXERS = ("mamba2", "gated_delta", "attention")
Mixer = Literal["mamba2", "gated_delta", "attention"]
MULTISTATE_MIXERS = ("mamba2", "gated_delta")       # the backbones that take a multi-state core


def _fail(config, message: str):
  raise ValueError(f"{type(config).__name__}: {message}")


def _check_positive(config, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      _fail(config, f"{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  headdim: int = 64
  d_state: int = 128
  expand: int = 2
  conv_kernel: int = 4

  def __post_init__(self):
    _check_positive(self, "headdim", "d_state", "expand", "conv_kernel")


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
  num_heads: int = 6
  head_dim_k: int = 192
  head_dim_v: int = 384
  conv_kernel: int = 4

  def __post_init__(self):
    _check_positive(self, "num_heads", "head_dim_k", "head_dim_v", "conv_kernel")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  num_heads: int = 16
  num_kv_heads: int = 16
  head_dim: int = 96
  rope_theta: float = 5e5
  qk_norm: bool = False
  # None: dlax's einsum softmax; "xla" / "cudnn": `jax.nn.dot_product_attention` (cudnn: fused
  # flash attention on NVIDIA GPUs, bf16/fp16). Cached decoding always uses the einsum path.
  implementation: str | None = None

  def __post_init__(self):
    _check_positive(self, "num_heads", "num_kv_heads", "head_dim")
    if self.implementation not in (None, "xla", "cudnn"):
      _fail(self, f"implementation must be None, 'xla' or 'cudnn', got {self.implementation!r}")
    if self.num_heads % self.num_kv_heads:
      _fail(self, f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
            f"({self.num_kv_heads})")
    if self.head_dim % 2:
      _fail(self, f"head_dim must be even for RoPE, got {self.head_dim}")
    if not self.rope_theta > 0:
      _fail(self, f"rope_theta must be positive, got {self.rope_theta}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only LM: n_layers × [RMSNorm → mixer → +, RMSNorm → SwiGLU → +], RMSNorm, head.

  `dtype` is the compute dtype and `param_dtype` the storage dtype (names such as "bfloat16").
  `impl` picks the linear-attention backend of `dlax.ops` ("chunked" XLA, "pallas_triton",
  "pallas_tpu", None = the platform's kernel, ...).
  Only the sub-config of the chosen `mixer` is used. `multistate` replaces the core of a Mamba-2 or
  GDN mixer by Log-Linear attention (`log_linear`) or DLA (`dla`).
  """
  vocab_size: int
  d_model: int
  n_layers: int
  mixer: Mixer
  d_ff: int
  tie_embeddings: bool = False
  init_std: float = 0.02
  norm_eps: float = 1e-6
  chunk_size: int = 64
  impl: str | None = "chunked"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = True
  mamba2: Mamba2Config = Mamba2Config()
  gated_delta: GatedDeltaNetConfig = GatedDeltaNetConfig()
  attention: AttentionConfig = AttentionConfig()
  multistate: Multistate = "none"
  dla: DLAConfig = DLAConfig()
  log_linear: LogLinearConfig = LogLinearConfig()

  def __post_init__(self):
    _check_positive(self, "vocab_size", "d_model", "n_layers", "d_ff", "chunk_size")
    if self.mixer not in MIXERS:
      _fail(self, f"mixer must be one of {MIXERS}, got {self.mixer!r}")
    if self.impl is not None and self.impl not in IMPLS:
      _fail(self, f"impl must be None or one of {IMPLS}, got {self.impl!r}")
    if self.chunk_size > MAX_CHUNK_SIZE:
      _fail(self, f"chunk_size must be <= {MAX_CHUNK_SIZE}, got {self.chunk_size}")
    if not self.init_std > 0 or not self.norm_eps > 0:
      _fail(self, f"init_std and norm_eps must be positive, got {self.init_std}, {self.norm_eps}")
    for name in ("dtype", "param_dtype"):
      try:
        kind = jnp.dtype(getattr(self, name))
      except TypeError:
        kind = None
      if kind is None or not jnp.issubdtype(kind, jnp.floating):
        _fail(self, f"{name} must name a floating dtype, got {getattr(self, name)!r}")
    d_inner = self.d_model * self.mamba2.expand
    if self.mixer == "mamba2" and d_inner % self.mamba2.headdim:
      _fail(self, f"d_model·expand = {d_inner} must be divisible by mamba2.headdim "
            f"({self.mamba2.headdim})")
    self._check_multistate()

  def _check_multistate(self) -> None:
    if self.multistate not in MULTISTATE_MODES:
      _fail(self, f"multistate must be one of {MULTISTATE_MODES}, got {self.multistate!r}")
    if self.multistate != "none" and self.mixer not in MULTISTATE_MIXERS:
      _fail(self, f"multistate={self.multistate!r} needs a mixer in {MULTISTATE_MIXERS}, got "
            f"mixer={self.mixer!r}")
    for name, kind in (("dla", DLAConfig), ("log_linear", LogLinearConfig)):
      if not isinstance(getattr(self, name), kind):
        _fail(self, f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
    if self.multistate == "log_linear" and self.chunk_size & (self.chunk_size - 1):
      _fail(self, f"multistate='log_linear' needs a power-of-two chunk_size (Fenwick chunk "
            f"cascade), got {self.chunk_size}")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)


def tiny_config(mixer: Mixer, multistate: Multistate = "none", **overrides) -> ModelConfig:
  """A byte-level CPU model: vocab 256, d_model 64, 2 layers, chunk 16; DLA with K = 8 and
  Log-Linear with 9 λ levels (sequences up to 256 tokens get their own weight per level)."""
  base = ModelConfig(
      vocab_size=256, d_model=64, n_layers=2, mixer=mixer, d_ff=128, chunk_size=16,
      mamba2=Mamba2Config(headdim=16, d_state=16, expand=2),
      gated_delta=GatedDeltaNetConfig(num_heads=2, head_dim_k=16, head_dim_v=32),
      attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16),
      multistate=multistate, dla=DLAConfig(capacity=8), log_linear=LogLinearConfig(num_levels=9))
  return dataclasses.replace(base, **overrides)


def paper_config(mixer: Mixer, multistate: Multistate = "none", *, n_layers: int = 21,
                 **overrides) -> ModelConfig:
  """The Log-Linear recipe (spec §9): vocab 32000, d 1536, untied, init std 0.006, d_ff 4096.

  Mamba-2: 48 heads (headdim 64, d_state 128, expand 2); GDN: 6 heads, Dk 192, Dv 384;
  Transformer: 16 heads of 96, RoPE θ = 5e5 (21 layers ≈ 693M, 24 layers ≈ 778M parameters).
  DLA: K = Kλ = 30, τ = 0.6, open-slot score; Log-Linear: 15 λ levels (16K tokens).
  """
  base = ModelConfig(
      vocab_size=32000, d_model=1536, n_layers=n_layers, mixer=mixer, d_ff=4096,
      tie_embeddings=False, init_std=0.006,
      mamba2=Mamba2Config(headdim=64, d_state=128, expand=2),
      gated_delta=GatedDeltaNetConfig(num_heads=6, head_dim_k=192, head_dim_v=384),
      attention=AttentionConfig(num_heads=16, num_kv_heads=16, head_dim=96, rope_theta=5e5),
      multistate=multistate, dla=DLAConfig(capacity=30, tau=0.6),
      log_linear=LogLinearConfig(num_levels=15))
  return dataclasses.replace(base, **overrides)


PRESETS: dict[str, ModelConfig] = {
    **{f"{mixer}-tiny": tiny_config(mixer) for mixer in MIXERS},
    "mamba2-paper": paper_config("mamba2"),
    "gated_delta-paper": paper_config("gated_delta"),
    "attention-paper": paper_config("attention"),
    "attention-24l-paper": paper_config("attention", n_layers=24),
    **{f"{mixer}-{multistate}-{scale}": make(mixer, multistate)
       for mixer in MULTISTATE_MIXERS for multistate in ("log_linear", "dla")
       for scale, make in (("tiny", tiny_config), ("paper", paper_config))},
}

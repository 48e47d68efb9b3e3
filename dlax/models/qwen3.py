"""Dense Qwen3 (spec §2): an HF-compatible config and a causal LM built on `LanguageModel`.

Qwen3 is the attention `LanguageModel` with q/k RMSNorm before RoPE and no biases; this module
only maps the HF `config.json` onto `ModelConfig` and adds the HF-style entry points
(`__call__(input_ids, attention_mask)`, `from_pretrained`, `save_pretrained`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from dlax.models.config import AttentionConfig, ModelConfig
from dlax.models.lm import LanguageModel

FULL_ATTENTION = "full_attention"


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """The fields of an HF Qwen3 `config.json` that define the network.

  `extra` keeps every other field verbatim and `hf_keys` the original key order, so
  `from_hf_dict(d).to_hf_dict() == d` (both are ignored by hashing).
  """
  vocab_size: int = 151936
  hidden_size: int = 1024
  intermediate_size: int = 3072
  num_hidden_layers: int = 28
  num_attention_heads: int = 16
  num_key_value_heads: int = 8
  head_dim: int = 128
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 40960
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  layer_types: tuple[str, ...] | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, repr=False)
  hf_keys: tuple[str, ...] = dataclasses.field(default=(), hash=False, compare=False,
                                               repr=False)

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"Qwen3Config: num_attention_heads {self.num_attention_heads} is not "
                       f"divisible by num_key_value_heads {self.num_key_value_heads}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_hidden_layers:
        raise ValueError(f"Qwen3Config: layer_types has {len(self.layer_types)} entries for "
                         f"{self.num_hidden_layers} layers")
      other = sorted(set(self.layer_types) - {FULL_ATTENTION})
      if other:
        raise ValueError(f"Qwen3Config: only dense full-attention Qwen3 is supported; got "
                         f"layer_types {other} (sliding-window layers are rejected)")

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> Qwen3Config:
    """Parses an HF Qwen3 `config.json` dict; rejects what dlax does not implement."""
    if d.get("model_type", "qwen3") != "qwen3":
      raise ValueError(f"Qwen3Config: model_type must be 'qwen3', got {d['model_type']!r}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise ValueError(f"Qwen3Config: only default RoPE is supported, got {rope}")
    if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias", False):
      raise ValueError("Qwen3Config: needs hidden_act='silu' and attention_bias=false, got "
                       f"{d.get('hidden_act')!r}, {d.get('attention_bias')!r}")
    layer_types = d.get("layer_types")
    n_layers = d.get("num_hidden_layers", cls.num_hidden_layers)
    if layer_types is None and d.get("use_sliding_window"):
      first = d.get("max_window_layers", n_layers)
      layer_types = [FULL_ATTENTION if i < first else "sliding_attention"
                     for i in range(n_layers)]
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "hf_keys")]
    kw = {name: d[name] for name in names if name in d}
    if "rope_theta" in rope:
      kw.setdefault("rope_theta", rope["rope_theta"])
    if layer_types is not None:
      kw["layer_types"] = tuple(layer_types)
    if isinstance(kw.get("eos_token_id"), list):
      kw["eos_token_id"] = tuple(kw["eos_token_id"])
    extra = {k: copy.deepcopy(v) for k, v in d.items() if k not in names}
    return cls(**kw, extra=extra, hf_keys=tuple(d))

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `config.json` dict: the fields read by `from_hf_dict`, in their order."""
    known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("extra", "hf_keys")}
    for name in ("eos_token_id", "layer_types"):
      if isinstance(known[name], tuple):
        known[name] = list(known[name])
    full = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **known,
            **copy.deepcopy(self.extra)}
    if isinstance(full.get("rope_parameters"), dict):
      full["rope_parameters"]["rope_theta"] = self.rope_theta
    keys = self.hf_keys or tuple(full)
    return {k: full[k] for k in keys}

  def to_model_config(self, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = True,
                      attention_impl: str | None = None) -> ModelConfig:
    """The equivalent attention `ModelConfig` (q/k-norm on, no biases); `attention_impl` as
    `AttentionConfig.implementation`."""
    attention = AttentionConfig(num_heads=self.num_attention_heads,
                                num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim,
                                rope_theta=float(self.rope_theta), qk_norm=True,
                                implementation=attention_impl)
    return ModelConfig(vocab_size=self.vocab_size, d_model=self.hidden_size,
                       n_layers=self.num_hidden_layers, mixer="attention",
                       d_ff=self.intermediate_size, tie_embeddings=self.tie_word_embeddings,
                       init_std=self.initializer_range, norm_eps=self.rms_norm_eps,
                       dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(param_dtype).name,
                       remat=remat, attention=attention)


class Qwen3ForCausalLM(LanguageModel):
  """Qwen3 causal LM: `LanguageModel` with stacked, scanned (rematerialised) attention blocks.

  Parameters: `embedding [V, d]`, `blocks.{mixer_norm, mixer.{q,k,v,o}_proj, mixer.{q,k}_norm,
  mlp_norm, mlp.{gate,up,down}}` stacked on a leading [L] axis, `final_norm`, and `head` when
  embeddings are untied. `prefill` / `decode_step` are inherited (KV cache, no padding mask).
  """

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: bool = True, attention_impl: str | None = None):
    self.hf_config = config
    super().__init__(config.to_model_config(dtype=dtype, param_dtype=param_dtype, remat=remat,
                                            attention_impl=attention_impl), rngs=rngs)

  def __call__(self, input_ids, attention_mask=None):
    """input_ids `[B, T]` int, attention_mask `[B, T]` (1 = token, 0 = padding) -> logits
    `[B, T, V]` fp32 (fp64 when computing in fp64). Positions are 0..T−1 in every row; padded
    keys are hidden, and logits at padded positions are meaningless."""
    self._check_tokens(input_ids, rank=2)
    kv_mask = None
    if attention_mask is not None:
      if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} must equal input_ids "
                         f"shape {input_ids.shape}")
      kv_mask = jnp.asarray(attention_mask).astype(bool)
    x, _ = self._run_blocks(self._embed(input_ids), None, None, keep_cache=False,
                            kv_mask=kv_mask)
    return self._logits(x)

  @classmethod
  def from_pretrained(cls, path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                      remat: bool = True, mesh=None) -> Qwen3ForCausalLM:
    """Loads an HF Qwen3 folder (see `dlax.convert.hf.load_qwen3`)."""
    from dlax.convert.hf import load_qwen3
    return load_qwen3(path, dtype=dtype, param_dtype=param_dtype, remat=remat, mesh=mesh)

  def save_pretrained(self, path, *, dtype: str = "float32", max_shard_size=None) -> None:
    """Writes an HF Qwen3 folder (see `dlax.convert.hf.save_qwen3`)."""
    from dlax.convert.hf import save_qwen3
    save_qwen3(self, path, dtype=dtype, max_shard_size=max_shard_size)

"""`DlaxConfig`: the `transformers` config of an exported `dlax.models.LanguageModel`.

Pure PyTorch/`transformers` code (no jax, no dlax): `dlax.convert.lm_export.export_lm` copies this
file into the exported folder, next to `modeling_dlax.py`.

The fields mirror `dlax.models.ModelConfig`; its sub-configs (`mamba2`, `gated_delta`,
`attention`, `dla`, `log_linear`) are plain dicts. dlax's compute dtype is stored as
`compute_dtype` because `dtype` is the `transformers` field of the weights' dtype. `impl`,
`chunk_size`'s role in the JAX kernels, `compute_dtype`, `param_dtype` and `remat` are JAX
runtime options, kept so that the folder re-imports into the same `ModelConfig`
(`chunk_size` is also the chunk length of the PyTorch SSD / gated-delta forms).
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Defaults of dlax's sub-configs (dlax/models/config.py, dlax/layers/multistate.py).
MAMBA2_DEFAULTS = dict(headdim=64, d_state=128, expand=2, conv_kernel=4)
GATED_DELTA_DEFAULTS = dict(num_heads=6, head_dim_k=192, head_dim_v=384, conv_kernel=4)
ATTENTION_DEFAULTS = dict(num_heads=16, num_kv_heads=16, head_dim=96, rope_theta=5e5,
                          qk_norm=False, implementation=None)
DLA_DEFAULTS = dict(capacity=30, num_lambda=None, tau=0.6, score_ref="open", eps=1e-6,
                    eps_r=1e-6)
LOG_LINEAR_DEFAULTS = dict(num_levels=15)
MIXERS = ("mamba2", "gated_delta", "attention")
MULTISTATE_MODES = ("none", "log_linear", "dla")


def _merged(defaults: dict, given: dict | None, name: str) -> dict:
  given = dict(given or {})
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"DlaxConfig: unknown {name} fields {unknown}")
  return {**defaults, **given}


class DlaxConfig(PretrainedConfig):
  """Decoder-only LM: `n_layers` × [RMSNorm → mixer → +, RMSNorm → SwiGLU → +], RMSNorm, head.

  `mixer` is "attention" (RoPE + GQA softmax attention), "mamba2" or "gated_delta"; for the two
  recurrent mixers `multistate` selects the core: "none" (the plain recurrence), "log_linear"
  (Log-Linear attention) or "dla" (Dynamic Linear Attention).
  """

  model_type = "dlax"
  attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                   "intermediate_size": "d_ff"}

  def __init__(self, vocab_size: int = 256, d_model: int = 64, n_layers: int = 2,
               mixer: str = "attention", d_ff: int = 128, tie_embeddings: bool = False,
               init_std: float = 0.02, norm_eps: float = 1e-6, chunk_size: int = 64,
               impl: str | None = "chunked", compute_dtype: str = "float32",
               param_dtype: str = "float32", remat: bool = True, mamba2: dict | None = None,
               gated_delta: dict | None = None, attention: dict | None = None,
               multistate: str = "none", dla: dict | None = None,
               log_linear: dict | None = None, **kwargs):
    if mixer not in MIXERS:
      raise ValueError(f"DlaxConfig: mixer must be one of {MIXERS}, got {mixer!r}")
    if multistate not in MULTISTATE_MODES:
      raise ValueError(f"DlaxConfig: multistate must be one of {MULTISTATE_MODES}, got "
                       f"{multistate!r}")
    if multistate != "none" and mixer == "attention":
      raise ValueError(f"DlaxConfig: multistate={multistate!r} needs mixer 'mamba2' or "
                       "'gated_delta'")
    self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
    self.mixer, self.d_ff, self.tie_embeddings = mixer, d_ff, tie_embeddings
    self.init_std, self.norm_eps, self.chunk_size = init_std, norm_eps, chunk_size
    self.impl, self.compute_dtype, self.param_dtype, self.remat = (impl, compute_dtype,
                                                                   param_dtype, remat)
    self.mamba2 = _merged(MAMBA2_DEFAULTS, mamba2, "mamba2")
    self.gated_delta = _merged(GATED_DELTA_DEFAULTS, gated_delta, "gated_delta")
    self.attention = _merged(ATTENTION_DEFAULTS, attention, "attention")
    self.multistate = multistate
    self.dla = _merged(DLA_DEFAULTS, dla, "dla")
    self.log_linear = _merged(LOG_LINEAR_DEFAULTS, log_linear, "log_linear")
    kwargs["tie_word_embeddings"] = tie_embeddings
    kwargs.setdefault("use_cache", False)         # the PyTorch port keeps no decode cache
    super().__init__(**kwargs)

  @property
  def num_lambda(self) -> int:
    """Kλ: λ weights per head of the multi-state core (0 for multistate="none")."""
    if self.multistate == "dla":
      k = self.dla["num_lambda"]
      return self.dla["capacity"] if k is None else k
    if self.multistate == "log_linear":
      return self.log_linear["num_levels"]
    return 0

"""ModelConfig validation, presets, and parameter counts of the paper-scale models."""

import dataclasses
import math

import jax
import pytest
from flax import nnx

from dlax.models import (MIXERS, PRESETS, AttentionConfig, GatedDeltaNetConfig, LanguageModel,
                         Mamba2Config, ModelConfig, paper_config, tiny_config)


def _count_params(config: ModelConfig) -> int:
  """Parameter count from shapes only (`nnx.eval_shape`: nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _transformer_count(config: ModelConfig) -> int:
  """Closed form: embeddings + head + L·(4·d·H·hd + 3·d·d_ff + 2·d) + d."""
  d, a = config.d_model, config.attention
  attention = d * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim * d
  layer = attention + 3 * d * config.d_ff + 2 * d
  return 2 * config.vocab_size * d + config.n_layers * layer + d


@pytest.mark.parametrize("n_layers, millions", [(21, 693), (24, 778)])
def test_paper_transformer_parameter_counts(n_layers, millions):
  config = paper_config("attention", n_layers=n_layers)
  count = _count_params(config)
  assert count == _transformer_count(config)
  assert abs(count / 1e6 - millions) <= 0.01 * millions, count


def test_paper_presets_match_the_recipe():
  for mixer in MIXERS:
    config = PRESETS[f"{mixer}-paper"]
    assert (config.vocab_size, config.d_model, config.n_layers, config.d_ff) == (32000, 1536, 21,
                                                                              4096)
    assert not config.tie_embeddings and config.init_std == 0.006
  assert PRESETS["mamba2-paper"].d_model * 2 // PRESETS["mamba2-paper"].mamba2.headdim == 48
  assert PRESETS["attention-24l-paper"].n_layers == 24
  gdn = PRESETS["gated_delta-paper"].gated_delta
  assert (gdn.num_heads, gdn.head_dim_k, gdn.head_dim_v) == (6, 192, 384)
  # The recurrent paper models land near their reported sizes (Mamba-2 "780M", GDN ~0.8B).
  assert 0.75e9 < _count_params(PRESETS["mamba2-paper"]) < 0.85e9
  assert 0.75e9 < _count_params(PRESETS["gated_delta-paper"]) < 0.85e9


@pytest.mark.parametrize("mixer", MIXERS)
def test_tiny_presets_are_byte_level(mixer):
  config = PRESETS[f"{mixer}-tiny"]
  assert config == tiny_config(mixer)
  assert (config.vocab_size, config.d_model, config.n_layers, config.chunk_size) == (256, 64, 2, 16)
  assert _count_params(config) < 200_000


@pytest.mark.parametrize("make, message", [
    (lambda: AttentionConfig(num_heads=16, num_kv_heads=6), "divisible by num_kv_heads"),
    (lambda: AttentionConfig(head_dim=95), "head_dim must be even"),
    (lambda: tiny_config("rwkv"), "mixer must be one of"),
    (lambda: tiny_config("mamba2", d_model=60), r"d_model·expand = 120 .*headdim \(16\)"),
    (lambda: tiny_config("attention", d_model=0), "d_model must be a positive int"),
    (lambda: tiny_config("attention", n_layers=2.0), "n_layers must be a positive int"),
    (lambda: tiny_config("attention", impl="fast"), "impl must be None or one of"),
    (lambda: tiny_config("attention", chunk_size=512), "chunk_size must be <= 256"),
    (lambda: tiny_config("attention", dtype="int8"), "dtype must name a floating dtype"),
    (lambda: tiny_config("attention", param_dtype="float17"), "param_dtype must name"),
    (lambda: Mamba2Config(d_state=-1), "d_state must be a positive int"),
    (lambda: GatedDeltaNetConfig(num_heads=0), "num_heads must be a positive int"),
])
def test_invalid_configs_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_mamba2_divisibility_only_checked_for_mamba2():
  config = tiny_config("attention", d_model=60, attention=AttentionConfig(4, 2, 16))
  assert config.d_model == 60


def test_configs_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    tiny_config("attention").d_model = 8

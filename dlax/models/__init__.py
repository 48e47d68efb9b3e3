"""Language models built from `dlax.layers`: configs, presets, `LanguageModel` and Qwen3."""

from dlax.models.block import Block, make_mixer
from dlax.models.config import (MIXERS, MULTISTATE_MIXERS, PRESETS, AttentionConfig, DLAConfig,
                                GatedDeltaNetConfig, LogLinearConfig, Mamba2Config, ModelConfig,
                                paper_config, tiny_config)
from dlax.models.lm import LanguageModel, ModelCache
from dlax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "MIXERS", "MULTISTATE_MIXERS", "PRESETS", "AttentionConfig", "Block", "DLAConfig",
    "GatedDeltaNetConfig", "LanguageModel", "LogLinearConfig", "Mamba2Config", "ModelCache",
    "ModelConfig", "Qwen3Config", "Qwen3ForCausalLM", "make_mixer", "paper_config", "tiny_config",
]

"""Checkpoint conversion: Hugging Face Qwen3 folders <-> dlax models; LanguageModel <-> HF-style
folders with dlax's pure-PyTorch modeling file (`export_lm` / `import_lm`)."""

from dlax.convert.hf import (hf_to_params, load_qwen3, params_to_hf, placed_model,
                             qwen3_shapes, read_config, read_weights, save_qwen3, write_weights)
from dlax.convert.lm_export import export_lm, import_lm
from dlax.convert.safetensors_io import read_safetensors, write_safetensors

__all__ = [
    "export_lm", "hf_to_params", "import_lm", "load_qwen3", "params_to_hf", "placed_model", "qwen3_shapes",
    "read_config", "read_safetensors", "read_weights", "save_qwen3", "write_safetensors",
    "write_weights",
]

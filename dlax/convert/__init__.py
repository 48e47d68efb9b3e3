"""Checkpoint conversion: Hugging Face Qwen3 folders <-> dlax models."""

from dlax.convert.hf import (hf_to_params, load_qwen3, params_to_hf, placed_model,
                             qwen3_shapes, read_config, read_weights, save_qwen3, write_weights)
from dlax.convert.safetensors_io import read_safetensors, write_safetensors

__all__ = [
    "hf_to_params", "load_qwen3", "params_to_hf", "placed_model", "qwen3_shapes",
    "read_config", "read_safetensors", "read_weights", "save_qwen3", "write_safetensors",
    "write_weights",
]

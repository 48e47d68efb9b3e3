"""CoMeT (Collaborative Memory Transformer): configuration, host-side token layout, memory,
forward (`CometForCausalLM`)."""

from dlax.models.comet.config import (HF_FIELDS, OFFICIAL_CLASS_DEFAULTS, CometConfig,
                                      special_token_ids, tiny_comet_config)
from dlax.models.comet.layout import (IGNORE_LABEL, ChunkCounts, ChunkLayout, build_batch,
                                      build_chunk, build_layout, build_layout_exact,
                                      build_prompt_layout, chunk_counts, exact_lengths, fixed_plan,
                                      pad_plan, right_aligned_plan, shift_labels, uniform_plan,
                                      validate_plan)
from dlax.models.comet.memory import (OFFICIAL_KEYS, GlobalMemoryNet, LayerMemory, LowRankAdapter,
                                      TempMemoryNet, inject_memory, memory_nets, push_fifo,
                                      update_memory, update_memory_from_layout)
from dlax.models.comet.model import CometForCausalLM, MemoryNets, comet_cell, token_loss_sums

__all__ = [
    "HF_FIELDS", "IGNORE_LABEL", "OFFICIAL_CLASS_DEFAULTS", "OFFICIAL_KEYS", "ChunkCounts",
    "ChunkLayout", "CometConfig", "CometForCausalLM", "GlobalMemoryNet", "LayerMemory",
    "LowRankAdapter", "MemoryNets", "TempMemoryNet", "comet_cell", "inject_memory", "memory_nets",
    "push_fifo", "update_memory", "update_memory_from_layout", "build_batch", "build_chunk",
    "build_layout", "build_layout_exact", "build_prompt_layout", "chunk_counts", "exact_lengths",
    "fixed_plan", "pad_plan", "right_aligned_plan", "shift_labels", "special_token_ids",
    "tiny_comet_config", "token_loss_sums", "uniform_plan", "validate_plan",
]

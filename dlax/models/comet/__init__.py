"""CoMeT (Collaborative Memory Transformer): configuration, host-side token layout, memory,
forward (`CometForCausalLM`), generation, checkpoints and optimizer parameter groups."""

from dlax.models.comet.config import (HF_FIELDS, OFFICIAL_CLASS_DEFAULTS, CometConfig,
                                      special_token_ids, tiny_comet_config)
from dlax.models.comet.layout import (IGNORE_LABEL, ChunkCounts, ChunkLayout, build_batch,
                                      build_chunk, build_layout, build_layout_exact,
                                      build_prompt_layout, chunk_counts, concat_chunks,
                                      exact_lengths, fixed_plan, pad_plan, per_chunk,
                                      right_aligned_plan, shift_labels, stack_chunks,
                                      take_chunks, text_order_index, text_order_labels,
                                      truncate_chunks, uniform_plan, validate_plan)
from dlax.models.comet.memory import (OFFICIAL_KEYS, GlobalMemoryNet, LayerMemory, LowRankAdapter,
                                      TempMemoryNet, inject_memory, memory_nets, push_fifo,
                                      push_queue, update_memory, update_memory_from_layout)
from dlax.models.comet.model import CometForCausalLM, MemoryNets, comet_cell, token_loss_sums
from dlax.models.comet.checkpoint import (export_official, import_official, load_comet,
                                          official_config, official_shapes, resize_embedding,
                                          resized_vocab_size, save_comet)
from dlax.models.comet.generation import GenerationResult, generate, prefill
from dlax.models.comet.params import (MEMORY_LR_MULTIPLIER, comet_optimizer, comet_optimizer_for,
                                      new_embedding_rows_mask, param_labels, weight_decay_mask)

__all__ = [
    # config
    "HF_FIELDS", "OFFICIAL_CLASS_DEFAULTS", "CometConfig", "special_token_ids",
    "tiny_comet_config",
    # layout
    "IGNORE_LABEL", "ChunkCounts", "ChunkLayout", "build_batch", "build_chunk", "build_layout",
    "build_layout_exact", "build_prompt_layout", "chunk_counts", "concat_chunks", "exact_lengths",
    "fixed_plan", "pad_plan", "per_chunk", "right_aligned_plan", "shift_labels", "stack_chunks",
    "take_chunks", "text_order_index", "text_order_labels", "truncate_chunks", "uniform_plan",
    "validate_plan",
    # memory
    "OFFICIAL_KEYS", "GlobalMemoryNet", "LayerMemory", "LowRankAdapter", "TempMemoryNet",
    "inject_memory", "memory_nets", "push_fifo", "push_queue", "update_memory",
    "update_memory_from_layout",
    # model, generation, checkpoints, optimizer groups
    "CometForCausalLM", "MemoryNets", "comet_cell", "token_loss_sums", "GenerationResult",
    "generate", "prefill", "export_official", "import_official", "load_comet", "official_config",
    "official_shapes", "resize_embedding", "resized_vocab_size", "save_comet",
    "MEMORY_LR_MULTIPLIER", "comet_optimizer", "comet_optimizer_for", "new_embedding_rows_mask",
    "param_labels", "weight_decay_mask",
]

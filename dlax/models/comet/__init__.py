"""CoMeT (Collaborative Memory Transformer): configuration and host-side token layout."""

from dlax.models.comet.config import (HF_FIELDS, OFFICIAL_CLASS_DEFAULTS, CometConfig,
                                      special_token_ids, tiny_comet_config)
from dlax.models.comet.layout import (IGNORE_LABEL, ChunkCounts, ChunkLayout, build_batch,
                                      build_chunk, build_layout, build_layout_exact,
                                      build_prompt_layout, chunk_counts, exact_lengths, fixed_plan,
                                      pad_plan, right_aligned_plan, shift_labels, uniform_plan,
                                      validate_plan)

__all__ = [
    "HF_FIELDS", "IGNORE_LABEL", "OFFICIAL_CLASS_DEFAULTS", "ChunkCounts", "ChunkLayout",
    "CometConfig", "build_batch", "build_chunk", "build_layout", "build_layout_exact",
    "build_prompt_layout", "chunk_counts", "exact_lengths", "fixed_plan", "pad_plan",
    "right_aligned_plan", "shift_labels", "special_token_ids", "tiny_comet_config",
    "uniform_plan", "validate_plan",
]

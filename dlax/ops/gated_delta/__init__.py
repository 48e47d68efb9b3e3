"""Gated DeltaNet / gated delta rule."""

from dlax.ops.gated_delta.naive import delta_rule_solve, gated_delta_attention_matrix
from dlax.ops.gated_delta.op import gated_delta, gated_delta_step

__all__ = ["delta_rule_solve", "gated_delta", "gated_delta_attention_matrix", "gated_delta_step"]

"""NNX layers: thin parameter holders around the pure ops in `dlax.ops`.

Every mixer maps `[B, T, d] -> [B, T, d]` through `__call__(x, *, cache=None, pos=None,
return_metrics=False) -> (y, new_cache)` (plus a dict of per-head `[H]` metrics when
`return_metrics`; empty unless DLA) and builds an empty cache with
`init_cache(batch_size, max_len, dtype)`. The Mamba-2 and GDN mixers take a `multistate` mode
("none", "log_linear", "dla"); `DLAMamba2`, `LogLinearMamba2`, `DLAGatedDeltaNet` and
`LogLinearGatedDeltaNet` name those modes.
"""

from dlax.layers.attention import Attention, KVCache, apply_rope, causal_attention
from dlax.layers.conv import CausalConv1d, causal_conv1d
from dlax.layers.gated_deltanet import (DLAGatedDeltaNet, GatedDeltaNet, GatedDeltaNetCache,
                                        LogLinearGatedDeltaNet, l2_normalize)
from dlax.layers.mamba2 import DLAMamba2, LogLinearMamba2, Mamba2Cache, Mamba2Mixer
from dlax.layers.mlp import SwiGLU
from dlax.layers.multistate import (METRIC_NAMES, MULTISTATE_MODES, DLAConfig, LambdaScale,
                                    LogLinearConfig, MultiStateCore, decision_metrics)
from dlax.layers.norms import GatedRMSNorm, RMSNorm, rms_norm

__all__ = [
    "Attention", "CausalConv1d", "DLAConfig", "DLAGatedDeltaNet", "DLAMamba2", "GatedDeltaNet",
    "GatedDeltaNetCache", "GatedRMSNorm", "KVCache", "LambdaScale", "LogLinearConfig",
    "LogLinearGatedDeltaNet", "LogLinearMamba2", "METRIC_NAMES", "MULTISTATE_MODES",
    "Mamba2Cache", "Mamba2Mixer", "MultiStateCore", "RMSNorm", "SwiGLU", "apply_rope",
    "causal_attention", "causal_conv1d", "decision_metrics", "l2_normalize", "rms_norm",
]

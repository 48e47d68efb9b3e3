"""Training metrics: JSONL and TensorBoard writers (process 0 only), FLOPs per token and MFU.

Scalars are written as `{"step": s, name: value, ...}` JSON lines and as TensorBoard scalars
(`tensorboardX`). Per-layer DLA metrics (`[L, H]` arrays from `LanguageModel(...,
return_metrics=True)`) are averaged over heads and written as `dla/<name>/layer_<i>`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (datasheet figures, no sparsity).
PEAK_BF16_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device=None) -> float | None:
  """Peak dense bf16 FLOP/s of one device, or None when unknown (e.g. CPU)."""
  kind = getattr(device or jax.devices()[0], "device_kind", "")
  return next((flops for prefix, flops in PEAK_BF16_FLOPS.items() if kind.startswith(prefix)),
              None)


def flops_per_token(n_params: int, n_embedding_params: int, *, n_layers: int,
                    attention_width: int = 0, seq_len: int = 0) -> float:
  """Training FLOPs per token: 6·(non-embedding params) for the matrix products, plus
  6·L·T·width for softmax attention (causal: half of QKᵀ and PV, forward + backward), where
  width = heads·head_dim (0 for attention-free models)."""
  return 6.0 * (n_params - n_embedding_params) + 6.0 * n_layers * seq_len * attention_width


def mfu(tokens_per_second: float, flops_per_token_: float, n_devices: int = 1,
        device=None) -> float:
  """Model FLOPs utilisation in [0, 1], NaN when the device's peak is unknown."""
  peak = peak_flops(device)
  if peak is None:
    return math.nan
  return tokens_per_second * flops_per_token_ / (peak * n_devices)


def layer_metrics(metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
  """`{name: [L, H]}` → `{"dla/<name>/layer_<i>": head mean}`."""
  out = {}
  for name, values in metrics.items():
    per_layer = np.asarray(values, np.float64).reshape(np.shape(values)[0], -1).mean(-1)
    out.update({f"dla/{name}/layer_{i}": float(v) for i, v in enumerate(per_layer)})
  return out


class MetricsWriter:
  """Appends scalars to `<logdir>/metrics.jsonl` and TensorBoard event files in `logdir`.

  Only process 0 writes (`enabled` defaults to `jax.process_index() == 0`); the others are no-ops.
  """

  def __init__(self, logdir: str, *, jsonl: bool = True, tensorboard: bool = True,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = self._tensorboard = None
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    if jsonl:
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(logdir)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {name: float(value) for name, value in scalars.items()}
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
      self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in values.items():
        self._tensorboard.add_scalar(name, value, int(step))
      self._tensorboard.flush()

  def close(self) -> None:
    for sink in (self._jsonl, self._tensorboard):
      if sink is not None:
        sink.close()
    self._jsonl = self._tensorboard = None

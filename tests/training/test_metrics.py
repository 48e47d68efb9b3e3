"""Training metrics: JSONL/TensorBoard writing, per-layer DLA metrics, FLOPs and MFU."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from dlax_training.metrics import MetricsWriter, flops_per_token, layer_metrics, mfu, peak_flops


def _tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """Reads every scalar of the event files in `logdir` (TFRecord framing of Event protos)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_writer_records_jsonl_and_tensorboard(rng, tmp_path):
  values = rng.normal(size=(3, 2))
  writer = MetricsWriter(str(tmp_path), enabled=True)
  for step, (loss, lr) in enumerate(values):
    writer.write(step * 10, {"loss": loss, "lr": lr})
  writer.close()
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [0, 10, 20]
  np.testing.assert_allclose([[line["loss"], line["lr"]] for line in lines], values)
  scalars = _tensorboard_scalars(tmp_path)
  assert [s for s, _ in scalars["loss"]] == [0, 10, 20]
  np.testing.assert_allclose([v for _, v in scalars["loss"]], values[:, 0], rtol=1e-6)


def test_writer_is_silent_off_process_zero(tmp_path):
  writer = MetricsWriter(str(tmp_path / "logs"), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "logs").exists()


def test_layer_metrics_average_heads(rng):
  rate = rng.uniform(size=(3, 4))
  out = layer_metrics({"boundary_rate": rate})
  assert sorted(out) == [f"dla/boundary_rate/layer_{i}" for i in range(3)]
  np.testing.assert_allclose([out[f"dla/boundary_rate/layer_{i}"] for i in range(3)],
                             rate.mean(1))


def test_flops_and_mfu():
  per_token = flops_per_token(1_000_000, 200_000, n_layers=4, attention_width=64, seq_len=128)
  assert per_token == 6 * 800_000 + 6 * 4 * 128 * 64
  assert math.isnan(mfu(1e4, per_token)) or peak_flops() is not None   # CPU: unknown peak

  class H100:
    device_kind = "NVIDIA H100 80GB HBM3"

  assert mfu(1e5, 1e9, device=H100()) == pytest.approx(1e14 / 989e12)

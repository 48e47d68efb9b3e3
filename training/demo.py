"""The README's main command (`make demo`): train the tiny DLA demo on CPU and report.

    python -m dlax_training.demo [--config tiny_demo] [--resume] [section.key=value ...]

Trains `configs/tiny_demo.yaml` (a 2-layer DLA-Mamba2 on the embedded Jane Austen corpus, byte
tokens) with `dlax_training.loop.train`: a progress bar with tokens/s and ETA, metrics in
`runs/tiny_demo/metrics.jsonl` (and TensorBoard), checkpoints in `runs/tiny_demo/checkpoints`,
then perplexity on the held-out novel and passkey accuracy, printed as a table. Each run starts
afresh (the previous demo's checkpoints and metrics are removed) unless `--resume`.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import time

import jax
import numpy as np
from flax import nnx

from dlax_training.config import TrainConfig, load_config
from dlax_training.eval import format_table
from dlax_training.loop import TrainResult, summary_rows, train


def _remove_previous_run(config: TrainConfig) -> None:
  """The checkpoints and metrics files of an earlier run of this config; a checkpoint folder
  holding anything but checkpoint steps is left alone (and the run then resumes from it)."""
  folder = pathlib.Path(config.checkpoint.dir or "")
  step = re.compile(r"\d+(\.corrupt\d*|\.orbax-checkpoint-tmp.*)?")
  if config.checkpoint.dir and folder.is_dir() and all(step.fullmatch(entry.name)
                                                       for entry in folder.iterdir()):
    shutil.rmtree(folder)
  if config.logging.dir:
    logdir = pathlib.Path(config.logging.dir)
    for path in [logdir / "metrics.jsonl", *logdir.glob("events.out.tfevents.*")]:
      path.unlink(missing_ok=True)


def _describe(config: TrainConfig) -> str:
  model, data = config.model, config.data
  core = model.mixer if model.multistate == "none" else f"{model.multistate.upper()}-{model.mixer}"
  return (f"dlax demo: {core} LM ({model.n_layers} layers, d_model {model.d_model}), "
          f"{config.steps} steps of {data.global_batch_size}×{data.seq_len} {data.tokenizer} "
          f"tokens from the {data.source} corpus on {jax.device_count()}× "
          f"{jax.devices()[0].platform.upper()}")


def main(argv=None) -> TrainResult:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny_demo", help="preset name or YAML file")
  parser.add_argument("--resume", action="store_true",
                      help="continue the previous demo run instead of starting afresh")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args(argv)
  config = load_config(args.config, args.overrides)
  if not args.resume:
    _remove_previous_run(config)
  print(_describe(config), flush=True)
  start = time.perf_counter()
  result = train(config)
  n_params = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(result.model, nnx.Param)))
  rows = [("parameters", f"{n_params:,}"), *summary_rows(config, result),
          ("wall time (compilation included)", f"{time.perf_counter() - start:.0f} s")]
  print(format_table(rows), flush=True)
  return result


if __name__ == "__main__":
  main()

"""Small-scale evidence (issue 7): DLA against its base backbone and Log-Linear, and CoMeT's
passkey retrieval far beyond its training length. CPU, one command:

    python3 -m benchmarks.small_scale [--steps 1000] [--comet-steps 1500] [--out runs/small_scale]

1. **DLA-Mamba2 vs Mamba-2 vs Log-Linear-Mamba2.** The same tiny LM (`configs/tiny_demo.yaml`:
   2 layers, d_model 64, byte tokens, the same seed, optimizer and batches) with `model.multistate`
   = dla / none / log_linear, trained once on MQAR (4 pairs, 56 tokens, 32 rows of 64 a step) and
   once on passkey documents (8 rows of 256 tokens a step), `--steps` steps each. Evaluated with
   `dlax eval`'s MQAR (4–32 pairs) and passkey (256–2048 tokens, 5 depths) evaluations.
2. **CoMeT.** `configs/tiny_comet.yaml` (a random 2-layer Qwen3 backbone with CoMeT's memory,
   chunks of 64) fine-tuned on 256-token passkey documents for `--comet-steps` steps, then asked
   for the passkey at 256 … 8192 tokens (32× its training length) and beyond.

Prints one table per part and writes `small_scale.{md,json}` (to `$OUT` or `benchmarks/results/`);
the heat maps, MQAR curves and the DLA boundary picture go to `--out`, and the README's figures
are copied to `docs/figures/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.harness import device_facts, print_table, record
from dlax_training.config import load_config
from dlax_training.data import ByteTokenizer
from dlax_training.evals import make_adapter, run_dla_boundaries, run_mqar, run_passkey
from dlax_training.loop import train

MIXERS = {"DLA-Mamba2": "dla", "Mamba-2": "none", "Log-Linear-Mamba2": "log_linear"}
TASKS = {  # training data per task: 2048 tokens a step
    "mqar": ["data.source=mqar", "data.seq_len=64", "data.mqar.num_pairs=4",
             "data.global_batch_size=32"],
    "passkey": ["data.source=passkey", "data.seq_len=256", "data.global_batch_size=8"],
}
MQAR_PAIRS = (4, 8, 16, 32)
LM_PASSKEY_LENGTHS = (256, 512, 1024, 2048)
COMET_PASSKEY_LENGTHS = (256, 1024, 4096, 8192, 16384)
FIGURES = "docs/figures"


def parameter_count(model) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train_fresh(preset: str, overrides: list[str], run_dir: str):
  """Trains `preset` with `overrides` into a fresh `run_dir` -> (TrainResult, seconds)."""
  shutil.rmtree(run_dir, ignore_errors=True)
  config = load_config(preset, [*overrides, f"checkpoint.dir={run_dir}/checkpoints",
                                f"logging.dir={run_dir}", "eval.batches=0",
                                "eval.passkey_lengths=[]"])
  start = time.perf_counter()
  result = train(config, resume=False)
  return result, time.perf_counter() - start


def final_loss(result, last: int = 20) -> float:
  """Mean train loss of the last `last` steps."""
  losses = list(result.losses.values())
  return float(np.mean(losses[-last:]))


def compare_lms(args, tokenizer) -> list[dict]:
  rows = []
  for name, multistate in MIXERS.items():
    row = {"model": name}
    for task, data in TASKS.items():
      run_dir = os.path.join(args.out, f"{multistate}_{task}")
      result, seconds = train_fresh(
          "tiny_demo", [f"model.multistate={multistate}", f"steps={args.steps}", *data],
          run_dir)
      row["params"] = parameter_count(result.model)
      row[f"{task} loss"] = final_loss(result)
      row[f"{task} train s"] = seconds
      adapter = make_adapter(result.model, name=f"{name} ({task}-trained)")
      if task == "mqar":
        mqar = run_mqar(adapter, tokenizer, num_pairs=MQAR_PAIRS, num_examples=args.examples,
                        out_dir=run_dir)
        row.update({f"mqar@{p}": a for p, a in zip(MQAR_PAIRS, mqar["accuracy"])})
      else:
        passkey = run_passkey(adapter, tokenizer, lengths=LM_PASSKEY_LENGTHS,
                              num_examples=args.examples, out_dir=run_dir)
        accuracy = np.asarray(passkey["accuracy"]).mean(0)        # over depths
        row.update({f"passkey@{n}": a for n, a in zip(LM_PASSKEY_LENGTHS, accuracy)})
        if multistate == "dla":
          run_dla_boundaries(result.model, tokenizer, out_dir=run_dir)
          copy_figure(run_dir, "dla_boundaries.png", "dla_boundaries.png")
      if multistate == "dla" and task == "mqar":
        copy_figure(run_dir, "mqar.png", "mqar_dla.png")
    rows.append(row)
    print(row, flush=True)
  return rows


def comet_passkey(args, tokenizer) -> list[dict]:
  run_dir = os.path.join(args.out, "comet")
  max_len = max(COMET_PASSKEY_LENGTHS)
  result, seconds = train_fresh(
      "tiny_comet", [f"steps={args.comet_steps}", f"comet.memory.max_seq_length={2 * max_len}"],
      run_dir)
  passkey = run_passkey(make_adapter(result.model, name="tiny CoMeT (trained on 256 tokens)"),
                        tokenizer, lengths=COMET_PASSKEY_LENGTHS, num_examples=args.examples,
                        out_dir=run_dir)
  copy_figure(run_dir, "passkey.png", "comet_passkey.png")
  accuracy = np.asarray(passkey["accuracy"])
  rows = [{"length": n, "× train length": n / 256, "accuracy (mean over depths)": a,
           "worst depth": lo}
          for n, a, lo in zip(COMET_PASSKEY_LENGTHS, accuracy.mean(0), accuracy.min(0))]
  summary = {"train loss": final_loss(result), "train s": seconds,
             "params": parameter_count(result.model)}
  print(summary, flush=True)
  return rows, summary


def copy_figure(run_dir: str, name: str, as_name: str) -> None:
  os.makedirs(FIGURES, exist_ok=True)
  shutil.copyfile(os.path.join(run_dir, name), os.path.join(FIGURES, as_name))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000, help="training steps of each LM")
  parser.add_argument("--comet-steps", type=int, default=1500)
  parser.add_argument("--examples", type=int, default=8, help="examples per evaluation cell")
  parser.add_argument("--out", default="runs/small_scale")
  parser.add_argument("--parts", nargs="+", default=["lms", "comet"], choices=["lms", "comet"])
  args = parser.parse_args()
  facts = device_facts()
  tokenizer = ByteTokenizer()
  tables, results = [], {}
  if "lms" in args.parts:
    rows = compare_lms(args, tokenizer)
    columns = ["model", "params", "mqar loss", *(f"mqar@{p}" for p in MQAR_PAIRS),
               "passkey loss", *(f"passkey@{n}" for n in LM_PASSKEY_LENGTHS)]
    tables.append(print_table(rows, columns))
    results["lms"] = rows
  if "comet" in args.parts:
    rows, summary = comet_passkey(args, tokenizer)
    tables.append(print_table(rows, list(rows[0])) + "\n\n" + json.dumps(summary))
    results["comet"] = {"rows": rows, **summary}
  record("small_scale", {**facts, "args": vars(args)}, [results], "\n\n".join(tables))


if __name__ == "__main__":
  main()

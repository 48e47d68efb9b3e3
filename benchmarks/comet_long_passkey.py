"""CoMeT's passkey evaluation at up to 1M tokens: time grows linearly, memory stays flat.

    python3 -m benchmarks.comet_long_passkey [--lengths 4096 32768 262144 1048576]

A tiny random CoMeT (2-layer Qwen3 backbone, d 64, chunks of 64, FIFO budget 16, 4 global slots)
scores one passkey document per length (depth 0.5) through `dlax eval`'s streaming adapter, which
runs the model chunk by chunk with its constant-size memory. This measures the cost of the
evaluation, not accuracy (the weights are random; `benchmarks.small_scale` trains one). Prints
seconds per length and the process's peak resident memory after each length.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from flax import nnx

from benchmarks.harness import device_facts, print_table, record
from dlax.models.comet import CometForCausalLM, tiny_comet_config
from dlax.models.qwen3 import Qwen3Config
from dlax_training.data import ByteTokenizer
from dlax_training.evals import CometAdapter, run_passkey


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 262144, 1048576])
  args = parser.parse_args()
  tokenizer = ByteTokenizer()
  backbone = Qwen3Config(vocab_size=272, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
  config = tiny_comet_config(first_special_id=tokenizer.vocab_size, chunk_size=64,
                             temp_beacon_stride=8, temp_mem_budget=16,
                             max_seq_length=2 * max(args.lengths))
  adapter = CometAdapter(CometForCausalLM(backbone, config, rngs=nnx.Rngs(0)))
  rows = []
  for length in sorted(args.lengths):
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
      result = run_passkey(adapter, tokenizer, lengths=[length], depths=[0.5], num_examples=1,
                           out_dir=out_dir)
    seconds = time.perf_counter() - start
    rows.append({"length": length, "tokens": int(result["tokens"][0]), "seconds": seconds,
                 "µs/token": 1e6 * seconds / result["tokens"][0],
                 "peak RSS MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    print(rows[-1], flush=True)
  facts = device_facts()
  record("comet_long_passkey", facts,
         rows, print_table(rows, ["length", "tokens", "seconds", "µs/token", "peak RSS MB"]))


if __name__ == "__main__":
  main()

"""CoMeT streaming prefill against full-attention Qwen3: time and peak device memory (issue 4).

    python -m benchmarks.comet_prefill [--comet-lengths 32768 131072 1048576]
                                       [--full-lengths 32768 131072 262144] [--attention cudnn]

Model: Qwen3-0.6B's shape (d=1024, 28 layers, 16/8 heads of 128, SwiGLU 3072) with random bf16
weights; CoMeT uses the paper recipe (C=2048, G=512, s=8, Bt=2048; vocab resized to 152,320) and
prefills for 256 new tokens (§8.2: memory per layer, then the final chunk with its KV cache).
Full attention computes the KV cache of every prompt token and the last token's logits, with
`jax.nn.dot_product_attention`. Each method runs in its own process, lengths increasing, so a
length's peak is the process's running peak (`memory_stats()["peak_bytes_in_use"]`). Prompts are
random ids. Time: host clock around the whole prefill (CoMeT: host layout + one jitted call per
chunk), after a warm-up run (CoMeT: at the first length; full attention: at each length up to
256k, longer ones are timed once with compilation included); median of `--repeats` for lengths
≤ 128k.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import device_facts, print_table, record
from dlax.models.comet import CometConfig
from dlax.models.comet.generation import prefill
from dlax.models.comet.model import CometForCausalLM
from dlax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6)
TEXT_IDS = 151669            # stock Qwen3 tokenizer size: prompts draw ids below it
MAX_NEW_TOKENS = 256
WARM_UP_LIMIT = 262144       # longer full-attention runs are timed once, compilation included
GIB = 2 ** 30


def _peak_gib() -> float:
  """Peak device memory of this process so far (NaN where the backend keeps no statistics)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / GIB


def _timed(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run_comet(lengths, attention, repeats):
  config = CometConfig()
  backbone = Qwen3Config(vocab_size=152320, **QWEN3_0_6B)
  model = CometForCausalLM(backbone, config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                           param_dtype=jnp.bfloat16, attention_impl=attention)
  rng = np.random.default_rng(0)
  params_gib = _peak_gib()
  for i, length in enumerate(lengths):
    prompt = rng.integers(0, TEXT_IDS, length).astype(np.int32)
    run = lambda: prefill(model, [prompt], MAX_NEW_TOKENS)[:2]
    if i == 0:
      jax.block_until_ready(run())                      # compiles every shape used below
    seconds = _timed(run, repeats if length <= 131072 else 1)
    n_chunks = -(-length // config.chunk_size)
    yield dict(method="CoMeT", tokens=length, seconds=seconds,
               ms_per_chunk=seconds * 1e3 / n_chunks, tokens_per_s=length / seconds,
               peak_gib=_peak_gib(), params_gib=params_gib)


def run_full(lengths, attention, repeats):
  model = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, **QWEN3_0_6B), rngs=nnx.Rngs(0),
                           dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=False,
                           attention_impl=attention)

  @nnx.jit
  def full_prefill(model, ids):
    """ids `[1, T]` → (last-token logits `[1, V]`, KV cache `[L, 1, T, KV, hd]`)."""
    x, (cache, _) = model._run_blocks(model._embed(ids), None, None, keep_cache=True)
    return model._logits(x[:, -1:])[:, 0], cache

  rng = np.random.default_rng(0)
  params_gib = _peak_gib()
  for length in lengths:
    ids = jnp.asarray(rng.integers(0, TEXT_IDS, (1, length)), jnp.int32)
    row = dict(method="full attention", tokens=length, params_gib=params_gib)
    try:
      if length <= WARM_UP_LIMIT:
        jax.block_until_ready(full_prefill(model, ids))
      seconds = _timed(lambda: full_prefill(model, ids), repeats if length <= 131072 else 1)
      row.update(seconds=seconds, tokens_per_s=length / seconds, peak_gib=_peak_gib())
    except Exception as e:  # noqa: BLE001 - out of memory is a result here
      row.update(seconds=f"error: {str(e).splitlines()[0][:60]}")
    yield row


def _worker(args):
  run = {"comet": run_comet, "full": run_full}[args.worker]
  lengths = args.comet_lengths if args.worker == "comet" else args.full_lengths
  for row in run(lengths, args.attention, args.repeats):
    print("ROW " + json.dumps(row), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--comet-lengths", type=int, nargs="+", default=[32768, 131072, 1048576])
  parser.add_argument("--full-lengths", type=int, nargs="+", default=[32768, 131072, 262144])
  parser.add_argument("--attention", default="cudnn", choices=["cudnn", "xla", "none"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--worker", choices=["comet", "full"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.attention = None if args.attention == "none" else args.attention
  if args.worker:
    return _worker(args)
  facts = device_facts()
  rows = []
  for worker in ("comet", "full"):
    command = [sys.executable, "-m", "benchmarks.comet_prefill", "--worker", worker,
               "--attention", args.attention or "none", "--repeats", str(args.repeats),
               "--comet-lengths", *map(str, args.comet_lengths),
               "--full-lengths", *map(str, args.full_lengths)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    rows += [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode:
      rows.append(dict(method=worker, seconds=f"worker failed: {done.stderr.strip()[-300:]}"))
  comet = {r["tokens"]: r for r in rows if r["method"] == "CoMeT" and "peak_gib" in r}
  for r in rows:
    if r["method"] == "full attention" and r["tokens"] in comet and "peak_gib" in r:
      c = comet[r["tokens"]]
      r["time_vs_comet"] = r["seconds"] / c["seconds"]
      r["memory_vs_comet"] = r["peak_gib"] / c["peak_gib"]
  if comet:
    first = comet[min(comet)]
    for c in comet.values():
      c["peak_vs_first"] = c["peak_gib"] / first["peak_gib"]
  table = print_table(rows, ["method", "tokens", "seconds", "ms_per_chunk", "tokens_per_s",
                             "peak_gib", "peak_vs_first", "params_gib", "time_vs_comet",
                             "memory_vs_comet"])
  facts["attention"] = args.attention
  print(f"\n{facts}")
  record("comet_prefill", facts, rows, table)


if __name__ == "__main__":
  main()

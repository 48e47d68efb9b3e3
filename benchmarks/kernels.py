"""dlax's Pallas kernels vs dlax's XLA path vs flash-linear-attention 0.6.0, one process (issue 6).

    python3 -m benchmarks.kernels [--lengths 4096 16384] [--batch 8] [--repeats 10]

Every method gets the same random inputs (made once in numpy, copied to JAX and to torch): bf16
q, k, v (and beta, λ), fp32 log-decays, B=8, H=16, Dk=Dv=128, chunk 64. Rows:

- SSD (`dlax.ops.ssd`) vs fla `chunk_simple_gla`;
- Gated DeltaNet (`dlax.ops.gated_delta`, L2-normalised keys) vs fla `chunk_gated_delta_rule`;
- DLA-Mamba2 (K=30, C=64) vs fla `chunk_log_linear_attn` at the same shape, and at the Mamba-2
  shape (48 value heads, one shared q/k group, Dk=128, Dv=64), where fla's kernel compiles;
- DLA-GDN (K=30) against `chunk_gated_delta_rule` (fla has no log-linear GDN op).

Each cell is the median over up to `--repeats` rounds (at least 3; fewer for slow cells) of 5
back-to-back calls (1 for calls over 50 ms) between two device synchronisations (so launch latency
overlaps as in training), after a warm-up; "fwd+bwd" is the gradient of <o, dO> for all inputs. fla's gated backward passes refuse Triton < 3.7.1 on Hopper;
as instructed for timing only, `fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1` is set to True.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory for torch

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import device_facts, print_table, record
from dlax import ops

CALLS_PER_ROUND = 5           # 1 for cells slower than SLOW_CALL_S
SLOW_CALL_S = 0.05
SECONDS_PER_CELL = 3.0        # slow cells (the XLA DLA path) get fewer rounds, at least 3


def time_ms(call, sync, repeats: int) -> float:
  """Median milliseconds per call of `call()` (see the module docstring)."""
  call()
  sync()
  start = time.perf_counter()
  call()
  sync()
  once = time.perf_counter() - start
  calls = 1 if once > SLOW_CALL_S else CALLS_PER_ROUND
  repeats = max(3, min(repeats, int(SECONDS_PER_CELL / (once * calls))))
  rounds = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      call()
    sync()
    rounds.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(rounds)


def safe(fn):
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - reported in the table
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:60]}"


def numpy_inputs(rng, b, t, h, dk, dv, qk_groups, capacity):
  """q, k `[B, T, G, Dk]` (G = qk_groups), v `[B, T, H, Dv]`, g, beta `[B, T, H]`, λ."""
  k = rng.standard_normal((b, t, qk_groups, dk), np.float32)
  return dict(
      q=rng.standard_normal((b, t, qk_groups, dk), np.float32) * dk ** -0.5,
      k=k / np.linalg.norm(k, axis=-1, keepdims=True),
      v=rng.standard_normal((b, t, h, dv), np.float32),
      g=-np.logaddexp(0, rng.standard_normal((b, t, h), np.float32)).astype(np.float32) * 0.1,
      beta=1 / (1 + np.exp(-rng.standard_normal((b, t, h), np.float32))),
      lam=np.logaddexp(0, rng.standard_normal((b, t, h, capacity), np.float32)).astype(np.float32),
      d_out=rng.standard_normal((b, t, h, dv), np.float32))


def to_jax(x: dict) -> dict:
  as_bf16 = {name: jnp.asarray(a, jnp.bfloat16) for name, a in x.items() if name != "g"}
  return {**as_bf16, "g": jnp.asarray(x["g"], jnp.float32)}


# dlax


INPUTS = {"ssd": ("q", "k", "v", "g"), "gdn": ("q", "k", "v", "g", "beta"),
          "dla": ("q", "k", "v", "g", "lam"), "dla_gdn": ("q", "k", "v", "g", "beta", "lam"),
          "log_linear": ("q", "k", "v", "g", "lam")}


def dlax_fn(kind: str, impl: str, capacity: int, chunk: int, heads: int):
  """(inputs) -> o for one op; q, k are broadcast from their groups to the value heads."""

  def expand(x):
    return jnp.repeat(x, heads // x.shape[2], axis=2) if x.shape[2] != heads else x

  def fn(x):
    q, k, v, g = expand(x["q"]), expand(x["k"]), x["v"], x["g"]
    if kind == "ssd":
      return ops.ssd(q, k, v, g, scale=1.0, chunk_size=chunk, impl=impl)[0]
    if kind == "gdn":
      return ops.gated_delta(q, k, v, g, x["beta"], scale=1.0, chunk_size=chunk, impl=impl)[0]
    return ops.dla_attention(q, k, v, g, x["lam"], x.get("beta"), capacity=capacity,
                             chunk_size=chunk, scale=1.0, impl=impl)
  return fn


def jax_timings(fn, inputs: dict, d_out, repeats: int) -> tuple:
  """(forward ms, forward+backward ms) of `fn(inputs)`."""
  forward = jax.jit(fn)
  backward = jax.jit(jax.grad(
      lambda x, d_out: jnp.sum(fn(x).astype(jnp.float32) * d_out.astype(jnp.float32))))
  last = {}

  def timed(call):
    def run():
      last["out"] = call()
    return safe(lambda: time_ms(run, lambda: jax.block_until_ready(last["out"]), repeats))

  return timed(lambda: forward(inputs)), timed(lambda: backward(inputs, d_out))


# fla


def fla_timings(kind: str, x: dict, repeats: int) -> tuple:
  try:
    import torch

    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.log_linear_attn import chunk_log_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla
  except ImportError as e:
    return (f"unavailable: {e}",) * 2
  chunk_o.TRITON_ABOVE_3_7_1 = True          # timing only (see the module docstring)

  def cuda(name):
    dtype = torch.float32 if name == "g" else torch.bfloat16
    return torch.from_numpy(x[name]).to("cuda", dtype).requires_grad_(name != "d_out")

  t = {name: cuda(name) for name in (*INPUTS[kind], "d_out")}
  heads = t["v"].shape[2]

  def expand(a):
    return a.repeat_interleave(heads // a.shape[2], dim=2) if a.shape[2] != heads else a

  def forward():
    q, k, v, g = t["q"], t["k"], t["v"], t["g"]
    if kind == "ssd":
      return chunk_simple_gla(expand(q), expand(k), v, g, scale=1.0)[0]
    if kind == "gdn":
      return chunk_gated_delta_rule(expand(q), expand(k), v, g, t["beta"], scale=1.0)[0]
    if kind == "log_linear":
      levels = int(math.log2(q.shape[1])) + 1
      return chunk_log_linear_attn(q, k, v, g, t["lam"][..., :levels].contiguous(), scale=1.0)[0]
    raise ValueError(kind)

  def backward():
    for name in INPUTS[kind]:
      t[name].grad = None
    forward().backward(t["d_out"])

  def run(call):
    with torch.no_grad() if call is forward else torch.enable_grad():
      return time_ms(call, torch.cuda.synchronize, repeats)

  try:
    return safe(lambda: run(forward)), safe(lambda: run(backward))
  finally:
    t.clear()
    torch.cuda.empty_cache()


CASES = [  # (name, dlax kind, fla kind, heads, qk groups, dk, dv)
    ("SSD", "ssd", "ssd", 16, 16, 128, 128),
    ("GDN", "gdn", "gdn", 16, 16, 128, 128),
    ("DLA-Mamba2 K=30", "dla", "log_linear", 16, 16, 128, 128),
    ("DLA-Mamba2 K=30 (48 heads, Dv=64)", "dla", "log_linear", 48, 1, 128, 64),
    ("DLA-GDN K=30 (vs GDN)", "dla_gdn", "gdn", 16, 16, 128, 128),
]


def record_row(row: dict) -> None:
  """Appends one row to `$OUT/kernels_rows.jsonl` as soon as it is measured (a run cut short by a
  time limit keeps what it measured)."""
  out = os.environ.get("OUT")
  if out:
    with open(os.path.join(out, "kernels_rows.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")


def ratio(a, b):
  return a / b if isinstance(a, float) and isinstance(b, float) else "-"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--capacity", type=int, default=30)
  parser.add_argument("--cases", nargs="*", help="case names to run (default all)")
  parser.add_argument("--impls", nargs="+", default=["pallas_triton", "chunked"],
                      help="dlax implementations to time (the XLA path is `chunked`)")
  args = parser.parse_args()
  facts = device_facts()
  rng = np.random.default_rng(0)
  rows = []
  started = time.perf_counter()
  for length in args.lengths:
    for name, kind, fla_kind, heads, groups, dk, dv in CASES:
      if args.cases and name not in args.cases:
        continue
      x = numpy_inputs(rng, args.batch, length, heads, dk, dv, groups, args.capacity)
      jx = to_jax({name: x[name] for name in INPUTS[kind]})
      d_out = jnp.asarray(x["d_out"], jnp.bfloat16)
      timings = {impl: jax_timings(dlax_fn(kind, impl, args.capacity, 64, heads), jx, d_out,
                                   args.repeats) if impl in args.impls else ("-", "-")
                 for impl in ("pallas_triton", "chunked")}
      timings["fla"] = fla_timings(fla_kind, x, args.repeats)
      del jx, d_out
      for p, pass_name in enumerate(("fwd", "fwd+bwd")):
        row = {"case": name, "T": length, "pass": pass_name,
               "pallas ms": timings["pallas_triton"][p],
               "xla ms": timings["chunked"][p], "fla ms": timings["fla"][p]}
        row["pallas/fla"] = ratio(row["pallas ms"], row["fla ms"])
        row["xla/fla"] = ratio(row["xla ms"], row["fla ms"])
        rows.append(row)
        print(f"[{time.perf_counter() - started:.0f} s]", row, flush=True)
        record_row(row)
  columns = ["case", "T", "pass", "pallas ms", "xla ms", "fla ms", "pallas/fla", "xla/fla"]
  print(f"\n{facts['device']}, jax {facts['jax']}, {facts['date']}, B={args.batch}, bf16")
  record("kernels", facts, rows, print_table(rows, columns))


if __name__ == "__main__":
  main()

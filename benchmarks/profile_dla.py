"""Where the time of DLA's Triton kernels goes: a GPU profile and the floor of bytes and FLOPs.

    python3 -m benchmarks.profile_dla [--batch 8 --length 4096 --heads 48 --dk 128 --dv 64]

Runs `dla_attention(impl="pallas_triton")` (Mamba-2, K=30, C=64, bf16 inputs, one shared q/k
group broadcast to the value heads) forward+backward once under `jax.profiler`, sums the GPU
kernel time by kernel name from the Perfetto trace, and sets it against the floor of the slot
pass (spec dla.md §7.4): with K̄ the mean number of live slots at a chunk start,

  forward   reads and writes every live slot state once per chunk: 2·K̄·Dk·Dv fp32 per (b, h, chunk);
            2·C·K̄·Dk·Dv (readout) + 2·C·Dk·Dv (writes) + 2·C²·Dv (intra-chunk) FLOPs;
  backward  recomputes the states (the forward's traffic again), reads them, reads and writes the
            slot cotangents: 4·K̄·Dk·Dv words; about twice the forward's FLOPs plus the recompute.

The floor is max(bytes / bandwidth, FLOPs / peak) at the measured H100 rates of KINDS.md
(3.0 TB/s copy, 798 TFLOP/s bf16). Writes `$OUT/profile_dla.{json,md}`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import device_facts, print_table, record, time_fn
from benchmarks.kernels import numpy_inputs, to_jax
from dlax import ops

BANDWIDTH = 3.0e12          # bytes/s, device-to-device copy measured on the H100 (KINDS.md)
PEAK_BF16 = 798e12          # FLOP/s, bf16 8192³ matmul measured on the H100 (KINDS.md)


def dla_loss(x, d_out, capacity: int, chunk: int):
  heads = x["v"].shape[2]
  expand = lambda a: jnp.repeat(a, heads // a.shape[2], axis=2)
  o = ops.dla_attention(expand(x["q"]), expand(x["k"]), x["v"], x["g"], x["lam"],
                        capacity=capacity, chunk_size=chunk, scale=1.0, impl="pallas_triton")
  return jnp.sum(o.astype(jnp.float32) * d_out.astype(jnp.float32))


def gpu_kernel_times(trace_dir: str) -> dict[str, tuple[int, float]]:
  """{kernel name: (calls, total ms)} of the GPU events in the Perfetto trace under trace_dir."""
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))["traceEvents"]
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in str(e.get("args", {}).get("name", ""))}
  totals = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    if e.get("ph") == "X" and e["pid"] in gpu_pids:
      totals[e["name"]][0] += 1
      totals[e["name"]][1] += e.get("dur", 0.0) / 1e3
  return {name: tuple(v) for name, v in totals.items()}


def floor_ms(b, t, h, dk, dv, chunk, live_slots) -> dict:
  chunks = b * h * -(-t // chunk)
  state_bytes = live_slots * dk * dv * 4
  fwd_flops = chunks * 2 * (chunk * live_slots * dk * dv + chunk * dk * dv + chunk * chunk * dv)
  fwd_bytes = chunks * 2 * state_bytes
  bwd_bytes = chunks * (2 + 4) * state_bytes                # recompute + reverse sweep
  bwd_flops = 3 * fwd_flops                                 # recompute + twice the forward
  ms = lambda n_bytes, flops: 1e3 * max(n_bytes / BANDWIDTH, flops / PEAK_BF16)
  return {"fwd floor ms": ms(fwd_bytes, fwd_flops),
          "fwd+bwd floor ms": ms(fwd_bytes + bwd_bytes, fwd_flops + bwd_flops),
          "state GB moved (fwd+bwd)": (fwd_bytes + bwd_bytes) / 1e9,
          "TFLOP (fwd+bwd)": (fwd_flops + bwd_flops) / 1e12}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=48)
  parser.add_argument("--dk", type=int, default=128)
  parser.add_argument("--dv", type=int, default=64)
  parser.add_argument("--capacity", type=int, default=30)
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  chunk = 64
  facts = device_facts()
  x = numpy_inputs(np.random.default_rng(0), args.batch, args.length, args.heads, args.dk,
                   args.dv, 1, args.capacity)
  jx = to_jax({name: x[name] for name in ("q", "k", "v", "g", "lam")})
  d_out = jnp.asarray(x["d_out"], jnp.bfloat16)
  grad = jax.jit(jax.grad(dla_loss), static_argnums=(2, 3))
  forward = jax.jit(lambda x: dla_loss(x, d_out, args.capacity, chunk))
  fwd_ms = time_fn(forward, jx, repeats=5)
  total_ms = time_fn(grad, jx, d_out, args.capacity, chunk, repeats=5)

  heads = args.heads
  _, _, aux = ops.dla_attention(
      jnp.repeat(jx["q"], heads, 2), jnp.repeat(jx["k"], heads, 2), jx["v"], jx["g"], jx["lam"],
      capacity=args.capacity, chunk_size=chunk, scale=1.0, impl="pallas_triton",
      return_cache=True, return_aux=True)
  live = float(np.mean(np.asarray(aux.num_slots[:, chunk - 1::chunk], np.float64)))

  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      jax.block_until_ready(grad(jx, d_out, args.capacity, chunk))
    kernels = gpu_kernel_times(trace_dir)
  traced = sum(ms for _, ms in kernels.values())
  rows = [{"kernel": name[:70], "calls": calls, "ms": ms, "%": 100 * ms / max(traced, 1e-9)}
          for name, (calls, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:args.top]]
  print(f"\n{facts['device']}, jax {facts['jax']}, {facts['date']}")
  print(f"B={args.batch} T={args.length} H={heads} Dk={args.dk} Dv={args.dv} K={args.capacity} "
        f"C={chunk} bf16; mean live slots at chunk starts {live:.1f}")
  summary = {"fwd ms": fwd_ms, "fwd+bwd ms": total_ms, "traced GPU ms (fwd+bwd)": traced,
             **floor_ms(args.batch, args.length, heads, args.dk, args.dv, chunk, live)}
  for name, value in summary.items():
    print(f"  {name}: {value:.2f}")
  table = print_table(rows, ["kernel", "calls", "ms", "%"])
  record("profile_dla", {**facts, "summary": summary, "live_slots": live}, rows,
         table + "\n\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in summary.items()))


if __name__ == "__main__":
  main()

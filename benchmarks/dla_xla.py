"""DLA's XLA path against its base backbone ops, forward and forward+backward (issue 3).

    python benchmarks/dla_xla.py [--lengths 4096 16384] [--batch 8]

Shapes: Mamba-2 style (H=16, Dk=Dv=128) and the paper's Gated DeltaNet heads (H=6, Dk=192,
Dv=384); bf16 inputs, fp32 log-decays; DLA with K=30, C=64, τ=0.6, Kλ=30.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks.harness import device_facts, print_table, record, safe_time
from dlax import ops

SHAPES = {"mamba2": dict(heads=16, dk=128, dv=128), "gdn": dict(heads=6, dk=192, dv=384)}


def random_inputs(key, backbone: str, batch: int, length: int, capacity: int):
  s = SHAPES[backbone]
  h, dk, dv = s["heads"], s["dk"], s["dv"]
  kq, kk, kv, kg, kb, kl = jax.random.split(key, 6)
  bf16 = jnp.bfloat16
  q = jax.random.normal(kq, (batch, length, h, dk), bf16)
  k = jax.random.normal(kk, (batch, length, h, dk), jnp.float32)
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(bf16)
  v = jax.random.normal(kv, (batch, length, h, dv), bf16)
  g = -jax.nn.softplus(jax.random.normal(kg, (batch, length, h), jnp.float32)) * 0.1
  beta = jax.nn.sigmoid(jax.random.normal(kb, (batch, length, h), jnp.float32)).astype(bf16)
  lam = jax.nn.softplus(jax.random.normal(kl, (batch, length, h, capacity), bf16))
  return q, k, v, g, (beta if backbone == "gdn" else None), lam


def forward_fns(backbone: str, capacity: int, chunk: int):
  scale = 1.0 if backbone == "mamba2" else SHAPES[backbone]["dk"] ** -0.5

  def base(q, k, v, g, beta, lam):
    if beta is None:
      return ops.ssd(q, k, v, g, scale=scale, chunk_size=chunk)[0]
    return ops.gated_delta(q, k, v, g, beta, scale=scale, chunk_size=chunk)[0]

  def dla(q, k, v, g, beta, lam):
    return ops.dla_attention(q, k, v, g, lam, beta, capacity=capacity, chunk_size=chunk,
                             scale=scale)

  return {"base": base, "dla": dla}


def with_backward(fn):
  """fwd+bwd: gradient of <o, dO> with respect to every differentiable input."""

  def loss(args, d_out):
    return jnp.sum(fn(*args).astype(jnp.float32) * d_out)

  @jax.jit
  def run(args, d_out):
    return jax.grad(loss)(args, d_out)

  return run


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--capacity", type=int, default=30)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--backbones", nargs="+", default=["mamba2", "gdn"])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  facts = device_facts()
  print(facts)
  rows = []
  for backbone in args.backbones:
    for length in args.lengths:
      inputs = random_inputs(jax.random.key(length), backbone, args.batch, length, args.capacity)
      d_out = jax.random.normal(jax.random.key(1), (*inputs[2].shape,), jnp.float32)
      row = {"backbone": backbone, "T": length, **SHAPES[backbone]}
      for name, fn in forward_fns(backbone, args.capacity, args.chunk).items():
        fwd = jax.jit(fn)
        row[f"{name} fwd ms"] = safe_time(fwd, *inputs, repeats=args.repeats)
        bwd = with_backward(functools.partial(fn))
        row[f"{name} fwd+bwd ms"] = safe_time(bwd, inputs, d_out, repeats=args.repeats)
      for mode in ("fwd", "fwd+bwd"):
        base, dla = row[f"base {mode} ms"], row[f"dla {mode} ms"]
        if isinstance(base, float) and isinstance(dla, float):
          row[f"dla/base {mode}"] = dla / base
      rows.append(row)
      print(row, flush=True)
  columns = ["backbone", "T", "heads", "dk", "dv", "base fwd ms", "dla fwd ms", "dla/base fwd",
             "base fwd+bwd ms", "dla fwd+bwd ms", "dla/base fwd+bwd"]
  table = print_table(rows, columns)
  record("dla_xla", facts, rows, table)


if __name__ == "__main__":
  main()

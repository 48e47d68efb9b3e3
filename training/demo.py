"""The README's main job: train a tiny DLA-ready language model on CPU for a few steps.

Byte-level model on the embedded default text, with a progress bar and the loss. The training
step is a pure function of (params, optimizer state, batch), jitted once, with the NNX module
rebuilt from its graph definition inside (`nnx.split` / `nnx.merge`).
"""

from __future__ import annotations

import argparse
import ast
import codecs
import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from dlax.models import LanguageModel, tiny_config


def embedded_text() -> bytes:
  """A small default corpus that ships with every Python: the Zen of Python (PSF licence).

  It is stored rot13-encoded in the standard library's `this.py`; read it without importing the
  module (which would print it).
  """
  source = pathlib.Path(importlib.util.find_spec("this").origin).read_text()
  literal = next(node.value for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Assign) and node.targets[0].id == "s")
  return codecs.decode(ast.literal_eval(literal), "rot13").encode("utf-8")


def batches(data: np.ndarray, batch_size: int, seq_len: int, seed: int):
  """Endless random windows `[batch, seq_len + 1]` of a byte array."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
    yield np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def make_train_step(graphdef, optimizer):
  """Returns a jitted `(params, opt_state, batch) -> (params, opt_state, loss)`."""

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  @jax.jit
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mixer", default="mamba2", choices=["mamba2", "gated_delta", "attention"])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  config = tiny_config(args.mixer)
  model = LanguageModel(config, rngs=nnx.Rngs(args.seed))
  graphdef, params = nnx.split(model)
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup_steps=max(1, args.steps // 10), decay_steps=args.steps))
  opt_state = optimizer.init(params)
  train_step = make_train_step(graphdef, optimizer)

  data = np.frombuffer(embedded_text(), dtype=np.uint8)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"dlax demo: {args.mixer} LM, {n_params:,} parameters, {len(data):,} bytes of text, "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens on {jax.devices()[0]}")
  stream = batches(data, args.batch_size, args.seq_len, args.seed)
  first = loss = None
  start = time.perf_counter()
  with tqdm(range(args.steps), unit="step") as bar:
    for step in bar:
      params, opt_state, loss = train_step(params, opt_state, jnp.asarray(next(stream)))
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}; stopping")
      first = loss if first is None else first
      bar.set_postfix(loss=f"{loss:.3f}")
  elapsed = time.perf_counter() - start
  tokens = args.steps * args.batch_size * args.seq_len
  print(f"loss {first:.3f} -> {loss:.3f} (uniform over bytes: {np.log(256):.3f}); "
        f"{tokens / elapsed:,.0f} tokens/s including compilation")
  return loss


if __name__ == "__main__":
  main()

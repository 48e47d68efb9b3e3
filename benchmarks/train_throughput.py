"""Training-step throughput (tokens/s, MFU) of the pre-training models at ~340M parameters (issue 5).

    python -m benchmarks.train_throughput [--seq-len 4096] [--batch 8] [--steps 3]
                                          [--models transformer mamba2 dla_mamba2 gdn dla_gdn]

Each model is the paper recipe (`paper_config`: vocab 32000, untied, DLA K=30, τ=0.6) scaled to
d=1024 (SwiGLU 2816; Mamba-2 32 heads of 64, d_state 128; GDN 4 heads, Dk 192, Dv 384;
Transformer 16 heads of 64), with the layer count whose total is closest to 340M parameters. One
training step: bf16 compute, fp32 master weights, next-token CE, AdamW (optax), layers scanned
and rematerialised, jitted with the parameters and optimizer state donated. Random token ids;
time = median over `--steps` steps after one compiling step. The Transformer's attention is
cuDNN's fused kernel by default (`--attention`). MFU counts 6·(non-embedding
parameters) FLOPs per token, plus softmax attention's 6·L·T·width for the Transformer; the
linear-attention state work is not counted, so their MFU is a lower bound.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.harness import device_facts, print_table, record
from dlax.models import LanguageModel
from dlax.models.config import AttentionConfig, GatedDeltaNetConfig, Mamba2Config, paper_config
from dlax_training.metrics import flops_per_token, mfu

TARGET_PARAMS = 340e6
MODELS = {
    "transformer": ("attention", "none"), "mamba2": ("mamba2", "none"),
    "dla_mamba2": ("mamba2", "dla"), "gdn": ("gated_delta", "none"),
    "dla_gdn": ("gated_delta", "dla"),
}


def _count(config) -> tuple[int, int]:
  """(total, embedding) parameter counts without allocating the model."""
  abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  embedding = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
  return total, embedding


def config_near_target(name: str, dtype: str = "bfloat16", attention_impl: str | None = None):
  """The paper config of `name` with the layer count whose size is closest to 340M."""
  mixer, multistate = MODELS[name]
  scaled = dict(d_model=1024, d_ff=2816, dtype=dtype,
                mamba2=Mamba2Config(headdim=64, d_state=128, expand=2),
                gated_delta=GatedDeltaNetConfig(num_heads=4, head_dim_k=192, head_dim_v=384),
                attention=AttentionConfig(num_heads=16, num_kv_heads=16, head_dim=64,
                                          rope_theta=5e5, implementation=attention_impl))
  candidates = [paper_config(mixer, multistate, n_layers=n, **scaled) for n in range(8, 41)]
  return min(candidates, key=lambda c: abs(_count(c)[0] - TARGET_PARAMS))


def make_step(graphdef, optimizer):
  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def run(name: str, seq_len: int, batch: int, steps: int, attention_impl=None) -> dict:
  config = config_near_target(name, attention_impl=attention_impl)
  total, embedding = _count(config)
  model = LanguageModel(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  optimizer = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
  opt_state = optimizer.init(params)
  step = make_step(graphdef, optimizer)
  rng = np.random.default_rng(0)
  tokens = [jnp.asarray(rng.integers(0, config.vocab_size, (batch, seq_len + 1)), jnp.int32)
            for _ in range(2)]
  params, opt_state, loss = step(params, opt_state, tokens[0])           # compiles
  jax.block_until_ready(loss)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, tokens[(i + 1) % 2])
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  width = (config.attention.num_heads * config.attention.head_dim
           if config.mixer == "attention" else 0)
  per_token = flops_per_token(total, embedding, n_layers=config.n_layers,
                              attention_width=width, seq_len=seq_len)
  tokens_per_s = batch * seq_len / seconds
  return dict(model=name, layers=config.n_layers, params_m=total / 1e6, step_s=seconds,
              tokens_per_s=tokens_per_s, mfu=mfu(tokens_per_s, per_token),
              loss=float(loss))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--attention", default="cudnn", choices=["cudnn", "xla", "none"],
                      help="the Transformer's attention: jax.nn.dot_product_attention's "
                           "implementation, or none for dlax's einsum softmax")
  args = parser.parse_args()
  attention_impl = None if args.attention == "none" else args.attention
  rows = []
  for name in args.models:
    try:
      rows.append(run(name, args.seq_len, args.batch, args.steps, attention_impl))
    except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end
      rows.append(dict(model=name, step_s=f"error: {str(e).splitlines()[0][:80]}"))
    print(rows[-1], flush=True)
  table = print_table(rows, ["model", "layers", "params_m", "step_s", "tokens_per_s", "mfu",
                             "loss"])
  facts = {**device_facts(), "attention": args.attention}
  print(f"\n{facts}")
  record("train_throughput", facts, rows, table)


if __name__ == "__main__":
  main()

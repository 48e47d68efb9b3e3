"""What the loop trains, per `TrainConfig.task`: the model and its per-row token statistics.

    task = make_task(config, mesh)            # NotImplementedError: a pipeline is missing
    model = task.build_model()                # random init, or CoMeT's `comet.init_from`
    check_vocab(model, tokenizer)             # ConfigError: the tokenizer's ids do not fit
    batch = task.prepare(host_batch)          # numpy; CoMeT lays the chunks out on the host
    stats, layer_metrics = task.token_stats(model, batch, train=True)   # inside jit

Task "lm" trains `LanguageModel(config.model)` on next-token CE over the data's `loss_mask`
(`mesh.pipeline="gpipe"` runs its blocks through `dlax.parallel.gpipe`); task "comet" trains
`CometForCausalLM` on the labelled text tokens of a uniform chunk layout
(`mesh.pipeline="comet"`: `dlax.parallel.comet_pipeline`). `TokenStats` are per row, so one
function gives the training loss, perplexity and the passkey's greedy exact match (a row is
answered exactly when every labelled token is the argmax: greedy decoding then emits the answer).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dlax.models import LanguageModel
from dlax.models.config import ModelConfig
from dlax.models.comet import IGNORE_LABEL, CometForCausalLM, build_batch
from dlax_training.config import ConfigError, TrainConfig
from dlax_training.data import Tokenizer
from dlax_training.metrics import flops_per_token

Batch = dict[str, np.ndarray]


class TokenStats(NamedTuple):
  """Per-row sums over the labelled target tokens, each `[B]` float32."""
  nll: jax.Array        # Σ −log p(target)
  count: jax.Array      # number of labelled targets
  correct: jax.Array    # targets that are the argmax of the logits

  @property
  def loss(self) -> jax.Array:
    """Mean CE over every labelled token of the batch."""
    return jnp.sum(self.nll) / jnp.maximum(jnp.sum(self.count), 1)


def row_stats(logits, targets, mask, axes) -> TokenStats:
  """`TokenStats` of logits `[B, ..., V]` against integer targets `[B, ...]` where `mask`,
  summed over `axes`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  safe = jnp.where(mask, targets, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], -1)[..., 0]
  mask = mask.astype(jnp.float32)
  hit = (jnp.argmax(logp, -1) == safe).astype(jnp.float32)
  return TokenStats(jnp.sum(nll * mask, axes), jnp.sum(mask, axes), jnp.sum(hit * mask, axes))


PIPELINES = {"gpipe": ("dlax.parallel.gpipe", "gpipe_forward"),
             "comet": ("dlax.parallel.comet_pipeline", "comet_pipeline")}


def pipeline_function(config: TrainConfig):
  """The `dlax.parallel` function that runs `mesh.pipeline` (None for "none");
  NotImplementedError naming it when it is not available."""
  if config.mesh.pipeline == "none":
    return None
  module, name = PIPELINES[config.mesh.pipeline]
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as error:
    raise NotImplementedError(f"mesh.pipeline={config.mesh.pipeline!r} needs {module}.{name}, "
                              f"which is not available ({error})") from None


@dataclasses.dataclass
class LMTask:
  """Pre-training a `LanguageModel` (task "lm")."""
  config: TrainConfig
  mesh: Mesh

  def __post_init__(self):
    self.pipeline = pipeline_function(self.config)

  def build_model(self) -> LanguageModel:
    return LanguageModel(self.config.model, rngs=nnx.Rngs(self.config.seed))

  def abstract_model(self) -> LanguageModel:
    return nnx.eval_shape(self.build_model)

  @property
  def chunk_size(self) -> int:
    return self.config.model.chunk_size

  def prepare(self, batch: Batch) -> Batch:
    return {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]}

  def token_stats(self, model: LanguageModel, batch, *, train: bool = False):
    """(`TokenStats` per row, DLA per-layer metrics `{name: [L, H]}` or {})."""
    tokens = batch["tokens"]
    if train and self.pipeline is not None:
      logits = self.pipeline(model, tokens[:, :-1], self.mesh,
                             num_microbatches=self.config.mesh.microbatches)
      metrics = {}   # the pipelined blocks do not return DLA metrics
    else:
      logits, metrics = model(tokens[:, :-1], return_metrics=True)
    return row_stats(logits, tokens[:, 1:], batch["loss_mask"], axes=-1), metrics

  @property
  def attention_span(self) -> int:
    return self.config.data.seq_len


@dataclasses.dataclass
class CometTask:
  """Fine-tuning `CometForCausalLM` (task "comet") on uniform chunk layouts built on the host.

  A data row `tokens [T+1]` becomes the text `tokens[:T]` (T = seq_len, whole chunks) with the
  targets `tokens[1:T]` where `loss_mask`; the row's last target falls outside the text."""
  config: TrainConfig
  mesh: Mesh

  def __post_init__(self):
    self.pipeline = pipeline_function(self.config)
    self._loaded = None

  def build_model(self) -> CometForCausalLM:
    comet = self.config.comet
    kwargs = dict(dtype=jnp.dtype(comet.dtype), param_dtype=jnp.dtype(comet.param_dtype),
                  attention_impl=comet.attention_impl)
    if comet.init_from is None:
      return CometForCausalLM(comet.backbone, comet.memory, rngs=nnx.Rngs(self.config.seed),
                              **kwargs)
    if self._loaded is None:   # read the weights once; `abstract_model` needs them too
      self._loaded = CometForCausalLM.from_pretrained(comet.init_from, comet.memory,
                                                      seed=self.config.seed, **kwargs)
    return self._loaded

  def abstract_model(self) -> CometForCausalLM:
    if self.config.comet.init_from is not None:
      return self.build_model()
    return nnx.eval_shape(self.build_model)

  @property
  def chunk_size(self) -> int:
    return self.config.comet.memory.chunk_size

  def prepare(self, batch: Batch):
    tokens, mask = batch["tokens"][:, :-1], batch["loss_mask"]
    raw = np.full(tokens.shape, IGNORE_LABEL, np.int32)   # raw label i is the target of i − 1
    raw[:, 1:] = np.where(mask[:, :-1], tokens[:, 1:], IGNORE_LABEL)
    return build_batch([(ids, labels, None) for ids, labels in zip(tokens, raw)],
                       self.config.comet.memory, layout="uniform")

  def token_stats(self, model: CometForCausalLM, layout, *, train: bool = False):
    if train and self.pipeline is not None:
      (total, count), _ = self.pipeline(model, layout, self.mesh)
      # The pipeline sums over the batch: one "row" carries the totals (argmax is not needed).
      return TokenStats(total[None], count.astype(jnp.float32)[None], jnp.zeros((1,))), {}
    logits, _ = model.forward_chunks(layout)
    labels = layout.labels
    return row_stats(logits, labels, labels != IGNORE_LABEL, axes=(1, 2)), {}

  @property
  def attention_span(self) -> int:
    return self.config.comet.memory.max_chunk_len


Task = LMTask | CometTask
HELDOUT_SEED = 1_000_003   # added to data.seed: synthetic examples never seen in training


def describe_heldout(config: TrainConfig) -> str:
  """Where the perplexity of `eval.evaluate` comes from (see `dataset_options`)."""
  source = config.data.source
  if source == "embedded":
    return "embedded corpus, validation split"
  if source in ("passkey", "mqar"):
    return f"{source}, held-out seed"
  return f"{source} training files"


def dataset_options(config: TrainConfig, *, heldout: bool = False) -> dict:
  """`make_dataset` keyword arguments of the training data, or of the held-out data (the embedded
  corpus's validation split; synthetic examples of another seed; file sources have no split and
  give their training files)."""
  data = config.data
  synthetic = data.source in ("passkey", "mqar")
  options = dict(source=data.source, path=data.path, tokenizer=data.tokenizer,
                 seq_len=data.seq_len, global_batch_size=data.global_batch_size,
                 seed=data.seed + (HELDOUT_SEED if heldout and synthetic else 0))
  if data.source == "embedded":
    options["split"] = "validation" if heldout else "train"
  elif data.source == "jsonl":
    options["text_field"] = data.text_field
  elif data.source == "passkey":
    options.update(length=data.seq_len, digits=data.passkey.digits, depth=data.passkey.depth)
  elif data.source == "mqar":
    mqar = data.mqar
    options.update(num_pairs=mqar.num_pairs, num_queries=mqar.num_queries, key_len=mqar.key_len,
                   value_len=mqar.value_len)
  return options


def lm_config(model: LanguageModel | CometForCausalLM) -> ModelConfig:
  """The `ModelConfig` of a `LanguageModel`, or of a CoMeT model's Qwen3 backbone."""
  return model.backbone.config if isinstance(model, CometForCausalLM) else model.config


def model_flops_per_token(model, task: Task) -> float:
  """Training FLOPs per token (`metrics.flops_per_token`) of a (possibly abstract) model."""
  config = lm_config(model)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  embedding = 0 if config.tie_embeddings else config.vocab_size * config.d_model
  width = config.attention.num_heads * config.attention.head_dim
  return flops_per_token(n_params, embedding, n_layers=config.n_layers,
                         attention_width=width if config.mixer == "attention" else 0,
                         seq_len=task.attention_span)


def check_vocab(model, tokenizer: Tokenizer) -> None:
  """`ConfigError` when the tokenizer emits ids the model cannot embed."""
  vocab = lm_config(model).vocab_size
  if vocab < tokenizer.vocab_size:
    where = "model.vocab_size" if isinstance(model, LanguageModel) else "the CoMeT vocabulary"
    raise ConfigError(f"{where} is {vocab} but the tokenizer ({type(tokenizer).__name__}) has "
                      f"{tokenizer.vocab_size} ids (pad {tokenizer.pad_id}, EOS "
                      f"{tokenizer.eos_id}); set model.vocab_size >= {tokenizer.vocab_size}")


def make_task(config: TrainConfig, mesh: Mesh) -> Task:
  return (CometTask if config.task == "comet" else LMTask)(config, mesh)

"""Evaluation: perplexity on held-out data and passkey retrieval accuracy, and the result table.

    stats_fn = lambda batch: ...        # host batch -> per-row `tasks.TokenStats` (numpy)
    results = evaluate(config, tokenizer, stats_fn, chunk_size)
    # {"eval/loss", "eval/perplexity", "eval/tokens", "eval/passkey_<length>", ...}

Held-out data (`tasks.dataset_options(config, heldout=True)`): the embedded corpus's "validation"
split (a novel kept out of training); for the synthetic sources, examples of another seed; file
sources have no split, so their perplexity is measured on the first batches of the training files.

Passkey: `data.global_batch_size` examples per length of `eval.passkey_lengths` (digits and depth
from `data.passkey`), right-padded to one common length (a multiple of the model's chunk size, so
all lengths share one compiled forward; padding after the answer cannot change causal outputs).
An example counts when every answer token is the argmax at its position: exactly when greedy
decoding after the question reproduces the answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from dlax_training.config import ConfigError, TrainConfig
from dlax_training.data import PasskeyDocuments, Tokenizer, make_dataset
from dlax_training.tasks import HELDOUT_SEED, TokenStats, dataset_options

Batch = dict[str, np.ndarray]
StatsFn = Callable[[Batch], TokenStats]


def perplexity(config: TrainConfig, stats_fn: StatsFn, *, process_index: int = 0,
               process_count: int = 1) -> dict[str, float]:
  """Mean CE and perplexity over `eval.batches` held-out batches (the same ones every time)."""
  batches = make_dataset(**dataset_options(config, heldout=True), shuffle=False, prefetch=0,
                         process_index=process_index, process_count=process_count)
  nll = count = 0.0
  with batches:
    for _, batch in zip(range(config.eval.batches), batches):
      stats = stats_fn(batch)
      nll, count = nll + float(np.sum(stats.nll)), count + float(np.sum(stats.count))
  loss = nll / max(count, 1.0)
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)), "eval/tokens": count}


def passkey_batch(tokenizer: Tokenizer, length: int, num_examples: int, *, pad_to: int,
                  digits: int = 5, depth: float | None = None, seed: int = 0) -> Batch:
  """`num_examples` passkey examples of about `length` tokens as a batch of `pad_to` + 1 tokens;
  `loss_mask` marks the answer's targets."""
  documents = PasskeyDocuments(length=length, depth=depth, digits=digits, seed=seed,
                               num_examples=num_examples, tokenizer=tokenizer)
  tokens = np.full((num_examples, pad_to + 1), tokenizer.pad_id, np.int32)
  mask = np.zeros((num_examples, pad_to), bool)
  for row in range(num_examples):
    ids, labels = tokenizer.encode_segments(documents[row])
    if len(ids) > pad_to + 1:
      raise ValueError(f"a passkey example of {len(ids)} tokens exceeds {pad_to + 1}")
    tokens[row, :len(ids)] = ids
    mask[row, :len(ids) - 1] = labels[1:]
  return {"tokens": tokens, "loss_mask": mask}


def check_passkey_lengths(config: TrainConfig, tokenizer: Tokenizer) -> None:
  """`ConfigError` for an `eval.passkey_lengths` entry shorter than a passkey example without
  filler (intro, needle, question and answer)."""
  passkey = config.data.passkey
  for length in config.eval.passkey_lengths:
    documents = PasskeyDocuments(length=length, digits=passkey.digits, num_examples=1,
                                 tokenizer=tokenizer)
    shortest = len(tokenizer.encode_segments(documents[0])[0])
    if shortest > length:
      raise ConfigError(f"eval.passkey_lengths: {length} tokens cannot hold a passkey example "
                        f"(at least {shortest} tokens with this tokenizer)")


def passkey_accuracy(config: TrainConfig, tokenizer: Tokenizer, stats_fn: StatsFn,
                     chunk_size: int, *, process_index: int = 0,
                     process_count: int = 1) -> dict[str, float]:
  """`{"eval/passkey_<length>": fraction answered exactly}` for each of `eval.passkey_lengths`."""
  lengths = config.eval.passkey_lengths
  if not lengths:
    return {}
  pad_to = -(-max(lengths) // chunk_size) * chunk_size
  rows = config.data.global_batch_size
  local = slice(process_index * rows // process_count, (process_index + 1) * rows // process_count)
  results = {}
  for length in lengths:
    batch = passkey_batch(tokenizer, length, rows, pad_to=pad_to, digits=config.data.passkey.digits,
                          depth=config.data.passkey.depth, seed=config.data.seed + HELDOUT_SEED)
    stats = stats_fn({name: value[local] for name, value in batch.items()})
    exact = (stats.correct == stats.count) & (stats.count > 0)
    results[f"eval/passkey_{length}"] = float(np.mean(exact))
  return results


def evaluate(config: TrainConfig, tokenizer: Tokenizer, stats_fn: StatsFn, chunk_size: int, *,
             process_index: int = 0, process_count: int = 1) -> dict[str, float]:
  """Perplexity (when `eval.batches` > 0) and passkey accuracy (module docstring)."""
  where = dict(process_index=process_index, process_count=process_count)
  results = perplexity(config, stats_fn, **where) if config.eval.batches else {}
  results.update(passkey_accuracy(config, tokenizer, stats_fn, chunk_size, **where))
  return results


def format_table(rows: Mapping[str, str] | list[tuple[str, str]]) -> str:
  """A two-column Markdown table ("metric", "value")."""
  rows = [("metric", "value"), *(rows.items() if isinstance(rows, Mapping) else rows)]
  widths = [max(len(row[i]) for row in rows) for i in (0, 1)]
  line = lambda name, value: f"| {name:{widths[0]}} | {value:{widths[1]}} |"
  rule = f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|"
  return "\n".join([line(*rows[0]), rule, *(line(*row) for row in rows[1:])])

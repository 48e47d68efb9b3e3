"""Forgetting curve: copy accuracy against the distance between a token and its first occurrence.

A row is `n` random tokens (drawn uniformly from `alphabet`) followed by their repetition, so each
repeated token lies exactly `n` tokens after its first occurrence. The scored tokens are the
repetition but its first token (nothing announces where the repetition starts); a token counts
when it is the argmax of the model's prediction. Random tokens make the curve independent of any
prompt or corpus: a model that cannot reach back `n` tokens scores the chance level
`1 / len(alphabet)`, a perfect copier 1.

Accuracies are pooled per distance and per log-scale bucket `[2^k, 2^(k+1))`.

JSON (`forgetting.json`): `{"eval": "forgetting", "model", "options", "distances": [D],
"accuracy": [D], "tokens_scored": [D], "buckets": [{"lo", "hi", "accuracy", "tokens_scored"}],
"chance", "alphabet_size", "seconds", "files"}`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np

from dlax_training.data import Tokenizer
from dlax_training.evals.adapters import ModelAdapter, make_adapter, score_rows
from dlax_training.evals.figures import format_length, new_figure, save_result

NAME = "forgetting"
DEFAULT_DISTANCES = (16, 32, 64, 128, 256, 512, 1024, 2048)


def default_alphabet(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
  """Every id below both vocabularies except the tokenizer's pad, EOS and BOS ids."""
  special = {tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id}
  return np.array([i for i in range(min(tokenizer.vocab_size, vocab_size)) if i not in special],
                  np.int32)


def copy_rows(distance: int, num_examples: int, alphabet: np.ndarray, *, seed: int = 0):
  """`(ids [2n], answer_mask [2n])` rows: n random tokens, then the same n tokens again; the
  answers are the repetition after its first token."""
  rows = []
  for index in range(num_examples):
    rng = np.random.default_rng([seed, distance, index])
    first = rng.choice(alphabet, distance)
    mask = np.zeros(2 * distance, bool)
    mask[distance + 1:] = True
    rows.append((np.concatenate([first, first]).astype(np.int32), mask))
  return rows


def run_forgetting(adapter: ModelAdapter, tokenizer: Tokenizer, *,
                   distances: Sequence[int] = DEFAULT_DISTANCES, num_examples: int = 4,
                   alphabet: Sequence[int] | None = None, seed: int = 0, batch_size: int = 8,
                   out_dir) -> dict:
  """Copy accuracy per distance (and log2 bucket) -> `forgetting.json` and the curve
  `forgetting.png`."""
  start = time.perf_counter()
  adapter = make_adapter(adapter)
  distances = sorted({int(n) for n in distances})
  if not distances or distances[0] < 2 or num_examples < 1:
    raise ValueError("forgetting needs distances >= 2 and at least one example")
  alphabet = (default_alphabet(tokenizer, adapter.vocab_size) if alphabet is None
              else np.asarray(alphabet, np.int32))
  if len(alphabet) < 2:
    raise ValueError("the alphabet needs at least two token ids")
  rows = [row for n in distances for row in copy_rows(n, num_examples, alphabet, seed=seed)]
  scores = score_rows(adapter, rows, batch_size=batch_size)
  hits, counts = np.zeros(len(distances)), np.zeros(len(distances))
  for i, (s, (_, mask)) in enumerate(zip(scores, rows)):
    hits[i // num_examples] += s.hit[mask].sum()
    counts[i // num_examples] += mask.sum()
  accuracy = hits / counts
  buckets = []
  for k in sorted({int(math.log2(n)) for n in distances}):
    inside = [i for i, n in enumerate(distances) if 2 ** k <= n < 2 ** (k + 1)]
    buckets.append({"lo": 2 ** k, "hi": 2 ** (k + 1), "accuracy": hits[inside].sum() /
                    counts[inside].sum(), "tokens_scored": counts[inside].sum()})
  chance = 1.0 / len(alphabet)

  figure = new_figure(6.5, 4)
  ax = figure.add_subplot()
  ax.plot(distances, accuracy, marker="o", label="copy accuracy")
  ax.axhline(chance, color="gray", linestyle="--", label=f"chance (1/{len(alphabet)})")
  ax.set_xscale("log", base=2)
  ticks = [b["lo"] for b in buckets]
  ax.set_xticks(ticks, labels=[format_length(n) for n in ticks])
  ax.minorticks_off()
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("distance to the first occurrence (tokens)")
  ax.set_ylabel("accuracy")
  ax.set_title(f"Forgetting curve: {adapter.name}", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  result = {
      "eval": NAME, "model": adapter.name,
      "options": dict(distances=distances, num_examples=num_examples, seed=seed,
                      batch_size=batch_size),
      "distances": distances, "accuracy": accuracy, "tokens_scored": counts, "buckets": buckets,
      "chance": chance, "alphabet_size": len(alphabet), "seconds": time.perf_counter() - start,
  }
  return save_result(out_dir, NAME, result, figure)

"""Passkey retrieval on a depth × context-length grid, drawn as a heat map.

Each cell holds `num_examples` documents of `data.PasskeyDocuments` (the passkey at that depth of
about that many tokens; the same seed in every cell, so the cells differ only in depth and
length). An example counts when every answer token is the argmax (`adapters` docstring): greedy
decoding after the question then returns the passkey.

JSON (`passkey.json`): `{"eval": "passkey", "model", "options", "depths": [D], "lengths": [L],
"tokens": [L] mean tokens per example, "accuracy": [D][L], "mean_accuracy", "examples_per_cell",
"seconds", "files"}`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from dlax_training.data import PasskeyDocuments, Tokenizer
from dlax_training.evals.adapters import ModelAdapter, make_adapter, score_rows, span_hits
from dlax_training.evals.figures import format_length, heatmap, new_figure, save_result

NAME = "passkey"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LENGTHS = (512, 1024, 2048, 4096)


def passkey_rows(tokenizer: Tokenizer, *, length: int, depth: float, num_examples: int,
                 digits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """`(ids, answer_mask)` of the cell's documents; ValueError when `length` cannot hold one."""
  documents = PasskeyDocuments(length=length, depth=depth, digits=digits, seed=seed,
                               num_examples=num_examples, tokenizer=tokenizer)
  rows = [tokenizer.encode_segments(documents[i]) for i in range(num_examples)]
  shortest = min(len(ids) for ids, _ in rows)
  if documents.num_filler == 0 and shortest > length:
    raise ValueError(f"passkey length {length} cannot hold an example ({shortest} tokens "
                     f"without filler)")
  return rows


def run_passkey(adapter: ModelAdapter, tokenizer: Tokenizer, *,
                lengths: Sequence[int] = DEFAULT_LENGTHS,
                depths: Sequence[float] = DEFAULT_DEPTHS, num_examples: int = 4, digits: int = 5,
                seed: int = 0, batch_size: int = 8, out_dir) -> dict:
  """Accuracy per (depth, length) -> `passkey.json` and the heat map `passkey.png` (depths as
  rows, lengths as columns, annotated cells)."""
  start = time.perf_counter()
  adapter = make_adapter(adapter)
  lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
  if not lengths or not depths or num_examples < 1:
    raise ValueError("passkey needs at least one length, one depth and one example")
  cells = [(d, n) for d in range(len(depths)) for n in range(len(lengths))]
  rows = []
  for d, n in cells:
    rows += passkey_rows(tokenizer, length=lengths[n], depth=depths[d],
                         num_examples=num_examples, digits=digits, seed=seed)
  scores = score_rows(adapter, rows, batch_size=batch_size)
  exact = np.array([span_hits(s, mask).all() for s, (_, mask) in zip(scores, rows)])
  accuracy = exact.reshape(len(depths), len(lengths), num_examples).mean(-1)
  tokens = np.array([len(ids) for ids, _ in rows]).reshape(len(depths), len(lengths), -1)

  figure = new_figure(1.3 * len(lengths) + 2.5, 0.55 * len(depths) + 1.6)
  ax = figure.add_subplot()
  heatmap(ax, accuracy, rows=[f"{d:.0%}" for d in depths],
          columns=[format_length(n) for n in lengths], colorbar_label="accuracy")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("passkey depth")
  ax.set_title(f"Passkey retrieval: {adapter.name}", fontsize=10)
  result = {
      "eval": NAME, "model": adapter.name,
      "options": dict(lengths=lengths, depths=depths, num_examples=num_examples, digits=digits,
                      seed=seed, batch_size=batch_size),
      "depths": depths, "lengths": lengths, "tokens": tokens.mean(axis=(0, 2)),
      "accuracy": accuracy, "mean_accuracy": float(accuracy.mean()),
      "examples_per_cell": num_examples, "seconds": time.perf_counter() - start,
  }
  return save_result(out_dir, NAME, result, figure)

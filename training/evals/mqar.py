"""MQAR (multi-query associative recall) accuracy against the number of key-value pairs, hence
the sequence length.

Documents are `data.MQARDocuments` (`"abc:07 xyz:42\\nxyz:42 abc:07"`, the values after the newline
labelled); each queried value is one answer span, counted when every token is the argmax.

JSON (`mqar.json`): `{"eval": "mqar", "model", "options", "num_pairs": [P], "tokens": [P] mean
tokens per example, "accuracy": [P] fraction of queries answered, "row_exact": [P] fraction of
examples with every query right, "chance": accuracy of guessing each value uniformly, "seconds",
"files"}`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from dlax_training.data import MQARDocuments, Tokenizer
from dlax_training.evals.adapters import ModelAdapter, make_adapter, score_rows, span_hits
from dlax_training.evals.figures import format_length, new_figure, save_result

NAME = "mqar"
DEFAULT_NUM_PAIRS = (4, 8, 16, 32, 64, 128)


def run_mqar(adapter: ModelAdapter, tokenizer: Tokenizer, *,
             num_pairs: Sequence[int] = DEFAULT_NUM_PAIRS, num_queries: int | None = None,
             key_len: int = 3, value_len: int = 2, num_examples: int = 8, seed: int = 0,
             batch_size: int = 8, out_dir) -> dict:
  """Accuracy per number of pairs (`num_queries` of them asked; None: all) -> `mqar.json` and
  `mqar.png`."""
  start = time.perf_counter()
  adapter = make_adapter(adapter)
  num_pairs = [int(p) for p in num_pairs]
  if not num_pairs or num_examples < 1:
    raise ValueError("mqar needs at least one pair count and one example")
  rows = []
  for pairs in num_pairs:
    documents = MQARDocuments(num_pairs=pairs, key_len=key_len, value_len=value_len, seed=seed,
                              num_examples=num_examples,
                              num_queries=None if num_queries is None else min(num_queries, pairs))
    rows += [tokenizer.encode_segments(documents[i]) for i in range(num_examples)]
  scores = score_rows(adapter, rows, batch_size=batch_size)
  spans = [span_hits(s, mask) for s, (_, mask) in zip(scores, rows)]
  accuracy, exact, tokens = [], [], []
  for p in range(len(num_pairs)):
    cell = slice(p * num_examples, (p + 1) * num_examples)
    accuracy.append(float(np.mean(np.concatenate(spans[cell]))))
    exact.append(float(np.mean([s.all() for s in spans[cell]])))
    tokens.append(float(np.mean([len(ids) for ids, _ in rows[cell]])))

  figure = new_figure(6.5, 4)
  ax = figure.add_subplot()
  ax.plot(num_pairs, accuracy, marker="o", label="queries answered")
  ax.plot(num_pairs, exact, marker="s", linestyle="--", label="examples fully right")
  ax.axhline(10.0 ** -value_len, color="gray", linestyle=":", label="chance (one value)")
  ax.set_xscale("log", base=2)
  ax.set_xticks(num_pairs, labels=[f"{p}\n{format_length(n)} tok" for p, n in
                                   zip(num_pairs, tokens)])
  ax.minorticks_off()
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel("key-value pairs (sequence length)")
  ax.set_ylabel("accuracy")
  ax.set_title(f"MQAR: {adapter.name}", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  result = {
      "eval": NAME, "model": adapter.name,
      "options": dict(num_pairs=num_pairs, num_queries=num_queries, key_len=key_len,
                      value_len=value_len, num_examples=num_examples, seed=seed,
                      batch_size=batch_size),
      "num_pairs": num_pairs, "tokens": tokens, "accuracy": accuracy, "row_exact": exact,
      "chance": 10.0 ** -value_len, "seconds": time.perf_counter() - start,
  }
  return save_result(out_dir, NAME, result, figure)

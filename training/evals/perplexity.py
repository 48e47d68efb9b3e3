"""Perplexity on held-out text, and the loss per position in the row.

The text is the held-out data of `eval.perplexity` (`tasks.dataset_options(heldout=True)`): by
default the embedded corpus's "validation" split (novels kept out of training), packed into rows
of `seq_len + 1` tokens in a fixed order, `batches` batches of `batch_size` rows. Any
`data.make_dataset` source works (`source`, `path`, `source_options`).

JSON (`perplexity.json`): `{"eval": "perplexity", "model", "options", "loss" (mean CE, nats),
"perplexity", "tokens", "per_position": {"start": [N], "end": [N], "loss": [N]} (mean CE of the
targets at positions [start, end) of the row), "seconds", "files"}`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np

from dlax_training.data import Tokenizer, make_dataset
from dlax_training.evals.adapters import ModelAdapter, make_adapter
from dlax_training.evals.figures import new_figure, save_result

NAME = "perplexity"


def run_perplexity(adapter: ModelAdapter, tokenizer: Tokenizer, *, source: str = "embedded",
                   path=None, source_options: Mapping | None = None, seq_len: int = 512,
                   batch_size: int = 4, batches: int = 8, seed: int = 0, bins: int = 64,
                   out_dir) -> dict:
  """Mean CE, perplexity and the per-position loss curve -> `perplexity.json`,
  `perplexity.png`."""
  start = time.perf_counter()
  adapter = make_adapter(adapter)
  if batches < 1 or bins < 1:
    raise ValueError("perplexity needs batches >= 1 and bins >= 1")
  options = dict(source_options or {})
  if source == "embedded":
    options.setdefault("split", "validation")
  data = make_dataset(source, path=path, tokenizer=tokenizer, seq_len=seq_len,
                      global_batch_size=batch_size, seed=seed, shuffle=False, prefetch=0,
                      **options)
  nll = np.zeros(seq_len + 1)
  count = np.zeros(seq_len + 1)
  with data:
    for _, batch in zip(range(batches), data):
      tokens = np.asarray(batch["tokens"])
      mask = np.concatenate([np.zeros((len(tokens), 1), bool),
                             np.asarray(batch["loss_mask"], bool)], axis=1)
      scores = adapter.score(tokens, mask)
      nll += scores.nll.sum(0)
      count += mask.sum(0)
  loss = float(nll.sum() / max(count.sum(), 1.0))
  edges = np.unique(np.linspace(1, seq_len + 1, min(bins, seq_len) + 1).round().astype(int))
  per_position = {"start": edges[:-1] - 1, "end": edges[1:] - 1,   # positions of predictions
                  "loss": [nll[a:b].sum() / max(count[a:b].sum(), 1.0)
                           for a, b in zip(edges[:-1], edges[1:])]}

  figure = new_figure(6.5, 4)
  ax = figure.add_subplot()
  middle = (per_position["start"] + per_position["end"] - 1) / 2
  ax.plot(middle, per_position["loss"], marker=".")
  ax.axhline(loss, color="gray", linestyle="--",
             label=f"mean {loss:.3f} (perplexity {math.exp(min(loss, 700.0)):.2f})")
  ax.set_xlabel("position in the row (tokens of context)")
  ax.set_ylabel("cross-entropy (nats)")
  ax.set_title(f"Held-out loss by position: {adapter.name}", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  result = {
      "eval": NAME, "model": adapter.name,
      "options": dict(source=source, path=None if path is None else str(path),
                      source_options=options, seq_len=seq_len, batch_size=batch_size,
                      batches=batches, seed=seed, bins=bins),
      "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": float(count.sum()),
      "per_position": per_position, "seconds": time.perf_counter() - start,
  }
  return save_result(out_dir, NAME, result, figure)

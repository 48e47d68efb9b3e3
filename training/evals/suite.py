"""Runs several evaluations on one model with one adapter: what `dlax eval --tasks` calls.

    results = run_suite(model, tokenizer, ["passkey", "mqar"], "eval_out", lengths=[512, 1024])
    summary_rows(results)       # [("passkey: mean accuracy", "0.85"), ...] for the result table

`lengths` (context lengths) goes to passkey and ruler, `num_examples` to every scoring
evaluation; anything else keeps each evaluation's defaults (see its module docstring).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from dlax_training.data import Tokenizer
from dlax_training.evals import EVALS, applicable, make_adapter

TAKES_LENGTHS = ("passkey", "ruler")
SCORING = ("passkey", "ruler", "mqar", "forgetting")


def run_suite(model, tokenizer: Tokenizer, tasks: Sequence[str], out_dir: str, *,
              lengths: Sequence[int] | None = None,
              num_examples: int | None = None) -> dict[str, dict]:
  """`{task: result}`; each task writes `<task>.json` and `<task>.png` into `out_dir`.
  `ValueError` for an unknown task or one that does not apply to this model."""
  adapter = make_adapter(model)
  possible = applicable(adapter)
  for task in tasks:
    if task not in EVALS:
      raise ValueError(f"unknown evaluation {task!r}; choose from {sorted(EVALS)}")
    if task not in possible:
      raise ValueError(f"evaluation {task!r} does not apply to this model; it can run {possible}")
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for task in tasks:
    options = {}
    if lengths and task in TAKES_LENGTHS:
      options["lengths"] = list(lengths)
    if num_examples and task in SCORING:
      options["num_examples"] = num_examples
    results[task] = EVALS[task](adapter, tokenizer, out_dir=out_dir, **options)
  return results


def summary_rows(results: dict[str, dict]) -> list[tuple[str, str]]:
  """One headline row per evaluation, then the folder of its files."""
  rows = []
  for task, result in results.items():
    if "mean_accuracy" in result:
      rows.append((f"{task}: mean accuracy", f"{result['mean_accuracy']:.3f}"))
    elif "perplexity" in result:
      rows.append((f"{task}: perplexity", f"{result['perplexity']:.2f}"))
    elif task in ("mqar", "forgetting"):
      accuracy = [a for a in result["accuracy"] if a is not None]
      rows.append((f"{task}: mean accuracy", f"{float(np.mean(accuracy)):.3f}"))
    rows.append((f"{task}: files", ", ".join(result["files"].values())))
  return rows

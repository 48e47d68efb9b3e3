"""Runs a notebook's code cells in order, headless, in one namespace (as a Jupyter kernel would).

    python examples/run_notebook.py examples/dlax_colab.ipynb

Used by CI (`tests/test_examples.py`, with `DLAX_NOTEBOOK_QUICK=1`) so that the Colab notebook
cannot rot. Markdown cells are skipped; a cell that raises stops the run with the cell's number
and source in the traceback. Shell (`!`) and magic (`%`) lines are not supported: the notebook
uses plain Python.
"""

from __future__ import annotations

import json
import sys
import time


def code_cells(path: str) -> list[str]:
  with open(path) as f:
    notebook = json.load(f)
  cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
  for i, source in enumerate(cells):
    if any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()):
      raise ValueError(f"{path} code cell {i}: shell/magic lines are not supported")
  return cells


def run(path: str) -> dict:
  """Executes every code cell of `path`; returns the shared namespace."""
  namespace = {"__name__": "__main__"}
  for i, source in enumerate(code_cells(path)):
    start = time.perf_counter()
    exec(compile(source, f"{path}[code cell {i}]", "exec"), namespace)
    print(f"--- code cell {i} done in {time.perf_counter() - start:.1f} s", flush=True)
  return namespace


if __name__ == "__main__":
  run(sys.argv[1])

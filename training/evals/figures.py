"""Figures and result files of the evaluations: matplotlib without pyplot (an Agg canvas, never a
display), a heat map helper, and `save_result` writing `<name>.json` and `<name>.png`."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100


def new_figure(width: float, height: float) -> Figure:
  """A figure drawn on its own Agg canvas (no global backend, no window)."""
  figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(figure)
  return figure


def format_length(n: int | float) -> str:
  """1536 -> "1.5K", 1048576 -> "1M" (binary units, as context lengths are quoted)."""
  n = float(n)
  for unit, size in (("M", 2 ** 20), ("K", 2 ** 10)):
    if n >= size:
      value = n / size
      return f"{value:.0f}{unit}" if value == round(value) else f"{value:.1f}{unit}"
  return f"{n:.0f}"


def heatmap(ax, values: np.ndarray, *, rows: Sequence[str], columns: Sequence[str],
            vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis", annotate: bool = True,
            fmt: str = "{:.2f}", colorbar_label: str | None = None):
  """`values [R, C]` as cells (NaN blank), row/column labels, cell annotations."""
  values = np.asarray(values, np.float64)
  image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax,
                    aspect="auto", interpolation="nearest")
  ax.set_xticks(range(len(columns)), labels=list(columns))
  ax.set_yticks(range(len(rows)), labels=list(rows))
  if annotate:
    middle = (vmin + vmax) / 2
    for (r, c), value in np.ndenumerate(values):
      if math.isfinite(value):
        ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=8,
                color="black" if value > middle else "white")
  colorbar = ax.figure.colorbar(image, ax=ax)
  if colorbar_label:
    colorbar.set_label(colorbar_label)
  return image


def to_json(value: Any) -> Any:
  """numpy scalars/arrays -> Python numbers/lists; non-finite floats -> None (strict JSON)."""
  if isinstance(value, dict):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if isinstance(value, np.ndarray):
    return to_json(value.tolist())
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, (np.integer, int)):
    return int(value)
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  return value


def save_result(out_dir, name: str, result: dict, figure: Figure) -> dict:
  """Writes `<out_dir>/<name>.json` (strict JSON of `result`) and `<out_dir>/<name>.png`;
  returns the JSON-ready result with `"files"` added."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  result = to_json({**result, "files": {"json": f"{name}.json", "png": f"{name}.png"}})
  (out / f"{name}.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
  figure.savefig(out / f"{name}.png", dpi=DPI)
  return result

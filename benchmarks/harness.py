"""Shared benchmark plumbing: timing, device facts, and the printed/recorded table.

Timing follows the device method: compile and warm up first, then time `repeats` runs with the
host clock around `block_until_ready`, and report the median. Inputs are random (never zeros).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import jax


def device_facts() -> dict:
  dev = jax.devices()[0]
  return {
      "device": getattr(dev, "device_kind", str(dev)),
      "platform": dev.platform,
      "jax": jax.__version__,
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": command_line(),
  }


def command_line() -> str:
  """The command that ran, with a benchmark module shown as `python -m benchmarks.<name>`."""
  script, *args = sys.argv
  if os.path.dirname(os.path.abspath(script)) == os.path.dirname(os.path.abspath(__file__)):
    script = f"-m benchmarks.{os.path.splitext(os.path.basename(script))[0]}"
  return " ".join([os.path.basename(sys.executable), script, *map(shlex.quote, args)])


def time_fn(fn, *args, warmup: int = 2, repeats: int = 10) -> float:
  """Median wall time in milliseconds of `fn(*args)` (already jitted), after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def safe_time(fn, *args, **kwargs):
  """`time_fn`, or the error's first line (e.g. out of memory) so one case cannot sink the run."""
  try:
    return time_fn(fn, *args, **kwargs)
  except Exception as e:  # noqa: BLE001 - reported in the table
    return f"error: {str(e).splitlines()[0][:80]}"


def print_table(rows: list[dict], columns: list[str]) -> str:
  def fmt(x):
    return f"{x:.2f}" if isinstance(x, float) else str(x)

  widths = [max([len(c), *(len(fmt(r.get(c, ""))) for r in rows)]) for c in columns]
  lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
           "-|-".join("-" * w for w in widths)]
  lines += [" | ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)) for r in rows]
  text = "\n".join(lines)
  print(text)
  return text


def record(name: str, facts: dict, rows: list[dict], table: str) -> None:
  """Writes `<name>.json` and `<name>.md` under $OUT (or ./benchmarks/results)."""
  out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump({**facts, "rows": rows}, f, indent=1)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(f"{facts['device']}, jax {facts['jax']}, {facts['date']}\n\n`{facts['command']}`\n\n")
    f.write(table + "\n")

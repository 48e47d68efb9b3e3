"""The Colab notebook runs headless on CPU with reduced steps (`examples/run_notebook.py`), and a
pip install from the git URL (here the local repository's) ships what the notebook loads."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "dlax_colab.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_colab_notebook_runs_headless(tmp_path):
  env = {**os.environ, "DLAX_NOTEBOOK_QUICK": "1"}
  proc = subprocess.run([sys.executable, str(ROOT / "examples" / "run_notebook.py"), str(NOTEBOOK)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  losses = re.findall(r"^(dla|comet): \d+ steps, loss ([\d.]+) -> ([\d.]+)$", proc.stdout,
                      flags=re.M)
  assert [name for name, *_ in losses] == ["dla", "comet"], proc.stdout[-4000:]
  for name, first, last in losses:
    assert math.isfinite(float(last)) and float(last) < float(first), (name, first, last)
  out = tmp_path / "dlax_colab"
  for picture in (out / "dla" / "dla_boundaries.png", out / "comet" / "passkey.png"):
    assert picture.read_bytes()[:8] == PNG_SIGNATURE, picture
  passkey = json.loads((out / "comet" / "passkey.json").read_text())
  assert passkey["lengths"] == [256, 1024] and len(passkey["accuracy"]) == 3


def test_notebook_is_committed_without_outputs():
  notebook = json.loads(NOTEBOOK.read_text())
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
  assert notebook["nbformat"] == 4


def test_git_url_install_ships_presets_and_corpus(tmp_path):
  """What the notebook's install cell does, minus the dependencies: `pip install git+<url>`."""
  if not (ROOT / ".git").exists():
    pytest.skip("not a git checkout")
  target = tmp_path / "site"
  proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                         str(target), f"dlax @ git+file://{ROOT}"],
                        capture_output=True, text=True, timeout=600)
  if proc.returncode != 0 and "setuptools" in proc.stderr and "Could not find" in proc.stderr:
    pytest.skip("no setuptools build backend reachable")
  assert proc.returncode == 0, proc.stderr[-3000:]
  check = ("import dlax_training.config as c, dlax_training.data as d; "
           "print(c.CONFIG_DIR); print(c.load_config('tiny_demo').steps)")
  env = {**os.environ, "PYTHONPATH": str(target)}
  run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  config_dir, steps = run.stdout.split()
  assert pathlib.Path(config_dir).is_relative_to(target) and steps == "300"
  assert (target / "dlax_training" / "data" / "corpus" / "austen.jsonl.xz").is_file()

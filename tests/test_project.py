"""Project-level checks: interpreter discovery, import names, and the demo job."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIND_PYTHON = ROOT / "scripts" / "find_python.sh"


def test_find_python_returns_a_312_interpreter():
  out = subprocess.run(["bash", str(FIND_PYTHON)], capture_output=True, text=True, check=True)
  path = out.stdout.strip()
  version = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2] >= (3, 12))"],
                           capture_output=True, text=True, check=True).stdout.strip()
  assert version == "True", path


def test_find_python_fails_clearly_without_312(tmp_path):
  # Only a 3.11-or-older `python3` on PATH and no pyenv: the script must say what is missing.
  env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYENV_ROOT": str(tmp_path / "pyenv")}
  probe = subprocess.run(["/bin/sh", "-c", "command -v python3.12 python3.13 python3.14"],
                         env=env, capture_output=True, text=True)
  if probe.stdout.strip():
    pytest.skip("this machine has a system Python >= 3.12 on /usr/bin")
  out = subprocess.run(["bash", str(FIND_PYTHON)], env=env, capture_output=True, text=True)
  system = subprocess.run(["/bin/sh", "-c", "python3 -c 'import sys; print(sys.version_info >= (3, 12))'"],
                          env=env, capture_output=True, text=True).stdout.strip()
  if system == "True":
    pytest.skip("this machine's system python3 is already >= 3.12")
  assert out.returncode == 1
  assert "needs Python >= 3.12" in out.stderr
  assert "pyenv install 3.12" in out.stderr


def test_import_names_do_not_collide():
  import dlax
  import dlax_kernels
  import dlax_training
  assert pathlib.Path(dlax_training.__file__).parent.name == "training"
  assert pathlib.Path(dlax_kernels.__file__).parent.name == "pallas_kernels"
  assert dlax.__version__


def test_demo_trains_and_loss_drops(tmp_path, capsys):
  from dlax_training import demo
  result = demo.main(["steps=25", "data.global_batch_size=8", "data.seq_len=48",
                      "optimizer.lr=1e-2", "schedule.warmup_steps=3", "logging.progress=false",
                      f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={tmp_path}",
                      "eval.batches=1", "eval.passkey_lengths=[256]"])
  out = capsys.readouterr().out
  losses = list(result.losses.values())
  assert len(losses) == 25 and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.5, out
  for row in ("train loss", "eval perplexity", "passkey accuracy @ 256 tokens", "checkpoint"):
    assert f"| {row}" in out, out
  assert (tmp_path / "ckpt" / "25").is_dir() and (tmp_path / "metrics.jsonl").is_file()

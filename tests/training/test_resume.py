"""Exact resumption (issue 5, acceptance 2 and 3): training runs in subprocesses, killed with
SIGKILL, restarted, given a corrupt newest checkpoint or a NaN loss, against one uninterrupted
reference run. The subprocesses share a persistent compilation cache, so only the first compiles.

Each run records, per step, the loss (metrics.jsonl, every step) and a hash of the batch it
trained on (`train(batch_hook=...)`), so both the losses and the data order are compared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dlax_training.checkpoint import MANIFEST, Checkpointer

REFERENCE_STEPS, EVERY = 60, 5
TINY = ["model.vocab_size=261", "data.seq_len=32", "data.global_batch_size=2",
        "schedule.warmup_steps=5", "schedule.total_steps=100", f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep=3", "logging.every_steps=1", "logging.tensorboard=false",
        "logging.progress=false", "eval.batches=0", "eval.passkey_lengths=[]"]

# `python -c DRIVER record_file nan_at_step overrides...`: trains tiny_demo with the overrides,
# appending "step batch-hash" to record_file; at step nan_at_step a token id past the vocabulary
# (embedded as NaN under jit) makes the loss NaN.
DRIVER = """
import hashlib, sys
from dlax_training.config import load_config
from dlax_training.loop import train
record, nan_at, *overrides = sys.argv[1:]
def hook(step, batch):
  with open(record, "a") as f:
    f.write(f"{step} {hashlib.sha1(batch['tokens'].tobytes()).hexdigest()}\\n")
  if step == int(nan_at):
    batch = dict(batch, tokens=batch["tokens"].copy())
    batch["tokens"][0, 3] = 10 ** 6
  return batch
train(load_config("tiny_demo", overrides), batch_hook=hook)
"""


def _command(run_dir, steps: int, nan_at: int = 0) -> list[str]:
  return [sys.executable, "-c", DRIVER, str(run_dir / "batches.txt"), str(nan_at), *TINY,
          f"steps={steps}", f"checkpoint.dir={run_dir / 'ckpt'}", f"logging.dir={run_dir}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PLATFORMS": "cpu"}


def _run(run_dir, steps: int, env, nan_at: int = 0) -> subprocess.CompletedProcess:
  return subprocess.run(_command(run_dir, steps, nan_at), env=env, capture_output=True, text=True,
                        timeout=300)


def _losses(run_dir) -> dict[int, float]:
  """The loss of every step; a step trained twice (before a kill, after the restart) keeps the
  later value."""
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines if line.endswith("}")]   # a kill may cut a line
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def _batches(run_dir) -> list[tuple[int, str]]:
  lines = (run_dir / "batches.txt").read_text().splitlines()
  return [(int(step), digest) for step, digest in (line.split() for line in lines
                                                     if len(line.split()) == 2
                                                     and len(line.split()[1]) == 40)]


def _runs(batches) -> list[list[int]]:
  """The steps of each run that wrote to this record (a new run starts at or below the last)."""
  runs = []
  for i, (step, _) in enumerate(batches):
    if i == 0 or step <= batches[i - 1][0]:
      runs.append([])
    runs[-1].append(step)
  return runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  run_dir = tmp_path_factory.mktemp("reference")
  done = _run(run_dir, REFERENCE_STEPS, env)
  assert done.returncode == 0, done.stderr
  losses, batches = _losses(run_dir), dict(_batches(run_dir))
  assert sorted(losses) == sorted(batches) == list(range(1, REFERENCE_STEPS + 1))
  return losses, batches


def _wait_for(process, run_dir, step: int, checkpoint: int, timeout: float = 240) -> None:
  """Until the run has logged `step` and committed checkpoint `checkpoint`."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      pytest.fail(f"the run ended (code {process.returncode}) before it could be killed:\n"
                  f"{process.stderr.read()}")
    committed = (run_dir / "ckpt" / str(checkpoint) / MANIFEST).exists()
    logged = (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= step
    if committed and logged:
      return
    time.sleep(0.01)
  pytest.fail("the run did not reach the kill point in time")


def test_sigkill_then_restart_gives_the_uninterrupted_losses_and_data(reference, tmp_path, env):
  ref_losses, ref_batches = reference
  process = subprocess.Popen(_command(tmp_path, REFERENCE_STEPS), env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    _wait_for(process, tmp_path, step=2 * EVERY + 2, checkpoint=EVERY)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
  finally:
    process.kill()
    process.stderr.close()
  killed_at = max(_losses(tmp_path))
  assert killed_at < REFERENCE_STEPS

  done = _run(tmp_path, REFERENCE_STEPS, env)
  assert done.returncode == 0, done.stderr
  batches = _batches(tmp_path)
  killed, restarted = _runs(batches)
  restart = restarted[0]
  assert killed[0] == 1 and 1 < restart <= killed_at + 1 and (restart - 1) % EVERY == 0
  assert restarted == list(range(restart, REFERENCE_STEPS + 1))
  # Bitwise: the JSON floats round-trip exactly.
  assert _losses(tmp_path) == ref_losses
  assert all(digest == ref_batches[step] for step, digest in batches)


def _corrupt(folder) -> None:
  """Flips a byte in the middle of the largest file of a checkpoint step."""
  path = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(reference, tmp_path, env):
  ref_losses, ref_batches = reference
  assert _run(tmp_path, 2 * EVERY, env).returncode == 0
  _corrupt(tmp_path / "ckpt" / str(2 * EVERY))
  done = _run(tmp_path, 3 * EVERY, env)
  assert done.returncode == 0, done.stderr
  assert "is unusable" in done.stderr and "falling back to the previous one" in done.stderr
  batches = _batches(tmp_path)
  assert _runs(batches) == [list(range(1, 2 * EVERY + 1)), list(range(EVERY + 1, 3 * EVERY + 1))]
  assert _losses(tmp_path) == {step: ref_losses[step] for step in range(1, 3 * EVERY + 1)}
  assert all(digest == ref_batches[step] for step, digest in batches)


def test_nan_loss_stops_with_a_diagnostic_and_keeps_the_last_good_checkpoint(reference, tmp_path,
                                                                             env):
  ref_losses, _ = reference
  nan_at = 2 * EVERY    # a checkpoint step: its state must not be saved
  done = _run(tmp_path, 3 * EVERY, env, nan_at=nan_at)
  assert done.returncode != 0
  assert f"non-finite training loss at step {nan_at}: loss=nan" in done.stderr
  assert "non-finite parameters:" in done.stderr and "the last good one" in done.stderr
  checkpointer = Checkpointer(str(tmp_path / "ckpt"))
  assert checkpointer.steps() == [EVERY]
  checkpointer.close()
  assert {s: ref_losses[s] for s in range(1, nan_at)} == {
      s: loss for s, loss in _losses(tmp_path).items() if s < nan_at}

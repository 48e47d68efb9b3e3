"""`dlax train` / `eval` / `generate --config` / `export`: config and override errors exit with one
clear line before anything is compiled; a tiny run trains, checkpoints, evaluates on every device
of the process, generates from its checkpoint and exports it for PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from dlax.cli import main
from dlax.convert import import_lm
from dlax.models.lm_generation import generate
from dlax_training.config import load_config
from dlax_training.loop import restore_checkpoint

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TINY = ["model.vocab_size=261", "model.mixer=attention", "model.multistate=none",
        "data.seq_len=32", "data.global_batch_size=8", "schedule.warmup_steps=1", "eval.batches=1",
        "eval.passkey_lengths=[]", "logging.progress=false"]


@pytest.fixture
def compilations():
  """The XLA compilations of the test's thread (`jax.monitoring` backend-compile events; other
  threads, e.g. of earlier tests, are not the test's)."""
  events, thread = [], threading.get_ident()

  def listener(event, duration, **kwargs):
    if event == COMPILE_EVENT and threading.get_ident() == thread:
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("overrides, message", [
    (["model.vocab_siz=300"], "unknown key 'model.vocab_siz' (did you mean 'vocab_size'?)"),
    (["optimizer.lr=fast"], "optimizer.lr: expected float, got 'fast'"),
    (["steps"], "override 'steps' must look like key=value"),
    (["model.dla.capacity=1"], "model.dla: DLAConfig: capacity must be an int >= 2, got 1"),
    (["mesh.data=3"], "has 3 devices but"),
    (["data.global_batch_size=3"], "data.global_batch_size (3) is not divisible"),
    (["model.vocab_size=258"], "data.tokenizer='byte' needs a vocabulary of >= 261 tokens, the model has 258"),
    (["eval.passkey_lengths=[100]"], "eval.passkey_lengths: 100 tokens cannot hold a passkey"),
    (["data.source=jsonl", "data.path=/nonexistent/*.jsonl"],
     "no .jsonl/.jsonl.gz/.jsonl.xz files at '/nonexistent/*.jsonl'"),
])
def test_config_errors_exit_before_compiling(overrides, message, tmp_path, compilations):
  base = ["model.vocab_size=261", "data.global_batch_size=8", "mesh.data=-1",
          f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}"]
  with pytest.raises(SystemExit) as exit_info:
    main(["train", "--config", "tiny_demo", *base, *overrides])
  assert str(exit_info.value).startswith("dlax train: ")
  assert message in str(exit_info.value)
  assert not compilations


def test_unknown_preset_and_missing_checkpoint(tmp_path, compilations):
  with pytest.raises(SystemExit, match="unknown preset 'tiny'; presets in .*tiny_demo"):
    main(["eval", "--config", "tiny"])
  with pytest.raises(SystemExit, match="config file .*missing.yaml' does not exist"):
    main(["train", "--config", str(tmp_path / "missing.yaml")])
  with pytest.raises(SystemExit, match="dlax eval: no checkpoint in"):
    main(["eval", "--config", "tiny_demo", "--checkpoint", str(tmp_path / "none"), *TINY])
  assert not compilations


def test_errors_are_one_line_on_stderr():
  done = subprocess.run([sys.executable, "-m", "dlax.cli", "train", "--config", "tiny_demo",
                         "optimizer.b1=2"], capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip() == ("dlax train: config error: optimizer: OptimizerConfig: b1 and "
                                 "b2 must be in [0, 1), got 2.0, 0.95")
  assert "Traceback" not in done.stderr


def _table(out: str) -> dict[str, str]:
  """The rows of a printed result table."""
  rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
  return {name.strip(): value.strip() for name, value in rows}


def test_train_then_eval(tmp_path, capsys):
  """Data × fsdp × tensor when the process has 8 devices (tests/conftest.py), else data only."""
  mesh = ["mesh.fsdp=2", "mesh.tensor=2"] if jax.device_count() == 8 else []
  run = [*TINY, *mesh, f"checkpoint.dir={tmp_path}/ckpt", f"logging.dir={tmp_path}"]
  assert main(["train", "--config", "tiny_demo", "steps=3", *run]) == 0
  trained = capsys.readouterr().out
  assert "| steps " in trained and "| eval perplexity " in trained
  assert main(["eval", "--config", "tiny_demo", "--checkpoint", f"{tmp_path}/ckpt", *run]) == 0
  evaluated = capsys.readouterr().out
  assert _table(evaluated)["checkpoint step"] == "3"
  assert _table(evaluated)["eval perplexity"] == _table(trained)["eval perplexity"]
  with pytest.raises(SystemExit, match=r"already holds steps \[3\]"):
    main(["train", "--config", "tiny_demo", "--fresh", "steps=3", *run])

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("It is a truth\nuniversally acknowledged,\n")
  assert main(["generate", "--config", "tiny_demo", "--checkpoint", f"{tmp_path}/ckpt",
               "--prompt-file", str(prompts), "--per-line", "--max-new-tokens", "5", "--json",
               *run]) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  session, step, params = restore_checkpoint(load_config("tiny_demo", run), f"{tmp_path}/ckpt")
  tokenizer = session.tokenizer
  lines = ["It is a truth", "universally acknowledged,"]
  expected = generate(session.model(params), [tokenizer.encode(p) for p in lines], 5,
                      eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  assert step == 3 and [p["prompt"] for p in printed] == lines
  for row, result in enumerate(printed):
    ids = expected.tokens[row, :expected.num_tokens[row]].tolist()
    assert result["token_ids"] == ids and len(ids) >= 1
    assert result["text"] == tokenizer.decode([i for i in ids if i != tokenizer.eos_id])

  evaluate = ["eval", "--config", "tiny_demo", "--checkpoint", f"{tmp_path}/ckpt", *run]
  assert main([*evaluate, "--tasks", "passkey,mqar", "--out", f"{tmp_path}/evals",
               "--lengths", "300", "--examples", "2"]) == 0
  table = _table(capsys.readouterr().out)
  assert table["passkey: files"] == "passkey.json, passkey.png"
  passkey = json.loads((tmp_path / "evals" / "passkey.json").read_text())
  assert passkey["lengths"] == [300] and float(table["passkey: mean accuracy"]) == pytest.approx(
      passkey["mean_accuracy"], abs=1e-3)
  assert (tmp_path / "evals" / "mqar.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(SystemExit, match="'dla_boundaries' does not apply to this model"):
    main([*evaluate, "--tasks", "dla_boundaries", "--out", f"{tmp_path}/evals"])

  export = ["export", "--config", "tiny_demo", "--checkpoint", f"{tmp_path}/ckpt", *run]
  assert main([*export, "--to", "torch", "--out", f"{tmp_path}/torch"]) == 0
  assert "step 3" in capsys.readouterr().out
  exported = nnx.state(import_lm(f"{tmp_path}/torch"), nnx.Param)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree.leaves(exported)):
    assert np.array_equal(np.asarray(got), np.asarray(want)), jax.tree_util.keystr(path)
  with pytest.raises(SystemExit, match="--to official is CoMeT's layout"):
    main([*export, "--to", "official", "--out", f"{tmp_path}/official"])


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of --model"),
    (["--model", "m", "--config", "tiny_demo"], "exactly one of --model"),
    (["--model", "m", "steps=3"], "go with --config"),
])
def test_generate_needs_one_model_source(tmp_path, args, message, capsys):
  prompts = tmp_path / "p.txt"
  prompts.write_text("hello")
  with pytest.raises(SystemExit):
    main(["generate", *args, "--prompt-file", str(prompts)])
  assert message in capsys.readouterr().err


def test_generate_without_checkpoint_is_one_line(tmp_path):
  prompts = tmp_path / "p.txt"
  prompts.write_text("hello")
  with pytest.raises(SystemExit, match=f"dlax generate: no checkpoint in {tmp_path}"):
    main(["generate", "--config", "tiny_demo", "--checkpoint", str(tmp_path), "--prompt-file",
          str(prompts), *TINY])

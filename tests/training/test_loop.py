"""The training loop on one CPU device: the tiny DLA model learns, metrics and evaluation are
written, checkpoints hold the final step, and settings that cannot work fail before compiling."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from dlax_training.checkpoint import Checkpointer
from dlax_training.config import ConfigError, load_config
from dlax_training.loop import Session, train
from dlax_training.optim import learning_rate_schedule

STEPS, LOG_EVERY, PASSKEY = 40, 5, 256
# tiny_demo shrunk: 2×32-token batches, a short warm-up, one held-out batch, one passkey length.
TINY = ["model.vocab_size=261", "data.seq_len=32", "data.global_batch_size=2", "optimizer.lr=1e-2",
        "schedule.warmup_steps=3", "eval.batches=1", f"eval.passkey_lengths=[{PASSKEY}]",
        "logging.progress=false", "checkpoint.every_steps=100"]


def tiny_config(tmp_path, *overrides):
  return load_config("tiny_demo", [*TINY, f"checkpoint.dir={tmp_path / 'ckpt'}",
                                   f"logging.dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("loop")
  config = tiny_config(tmp_path, f"steps={STEPS}", f"logging.every_steps={LOG_EVERY}")
  result = train(config, devices=jax.devices()[:1])
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  return config, result, lines, tmp_path


def test_loss_decreases(run):
  _, result, _, _ = run
  losses = np.array([result.losses[step] for step in range(1, STEPS + 1)])
  assert result.start_step == 0 and result.step == STEPS
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < losses[:5].mean() - 1.0, losses


def test_metrics_jsonl_has_the_required_keys(run):
  config, result, lines, tmp_path = run
  train_lines = [line for line in lines if "loss" in line]
  assert [line["step"] for line in train_lines] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  schedule = learning_rate_schedule(config)
  for line in train_lines:
    assert line["loss"] == result.losses[line["step"]]
    assert line["learning_rate"] == pytest.approx(float(schedule(line["step"] - 1)))
    assert line["grad_norm"] > 0 and line["tokens_per_second"] > 0
    assert line["tokens"] == line["step"] * 2 * 32
    assert "mfu" not in line     # the peak FLOP/s of a CPU is unknown
    for layer in range(config.model.n_layers):
      assert 0 <= line[f"dla/boundary_rate/layer_{layer}"] <= 1
      assert line[f"dla/mean_block_length/layer_{layer}"] >= 1
  (eval_line,) = [line for line in lines if "eval/perplexity" in line]
  assert eval_line["step"] == STEPS
  assert eval_line["eval/perplexity"] == pytest.approx(np.exp(eval_line["eval/loss"]))
  assert 0 <= eval_line[f"eval/passkey_{PASSKEY}"] <= 1
  assert {k: eval_line[k] for k in result.eval} == result.eval
  assert list(tmp_path.glob("events.out.tfevents.*"))


def test_final_checkpoint_holds_state_and_data_position(run):
  config, result, _, tmp_path = run
  with Checkpointer(str(tmp_path / "ckpt")) as checkpointer:
    assert checkpointer.steps() == [STEPS]
    restored = checkpointer.restore(STEPS, Session(config, jax.devices()[:1]).abstract_state())
  assert int(restored.state["step"]) == STEPS
  (data_state,) = restored.data_state["processes"]
  assert data_state["signature"]["seq_len"] == 32
  final = nnx.state(result.model, nnx.Param)
  for saved, trained in zip(jax.tree.leaves(restored.state["params"]), jax.tree.leaves(final)):
    np.testing.assert_array_equal(saved, trained)


def test_vocab_smaller_than_the_tokenizer_is_an_error(tmp_path):
  with pytest.raises(ConfigError, match=r"data.tokenizer='byte' needs a vocabulary of >= 261 "
                                        r"tokens, the model has 258"):
    train(tiny_config(tmp_path, "model.vocab_size=258"), devices=jax.devices()[:1])


def test_passkey_shorter_than_its_question_is_an_error(tmp_path):
  with pytest.raises(ConfigError, match="eval.passkey_lengths: 64 tokens cannot hold a passkey"):
    train(tiny_config(tmp_path, "eval.passkey_lengths=[64]"), devices=jax.devices()[:1])


def test_mesh_must_match_the_devices(tmp_path):
  with pytest.raises(ConfigError, match="has 2 devices but 1 are available"):
    train(tiny_config(tmp_path, "mesh.data=2"), devices=jax.devices()[:1])


def test_fresh_start_refuses_existing_checkpoints(run):
  config, _, _, _ = run
  with pytest.raises(ConfigError, match=f"already holds steps \\[{STEPS}\\]"):
    train(config, resume=False, devices=jax.devices()[:1])



def test_comet_fine_tuning_trains_resumes_and_evaluates(tmp_path):
  """configs/tiny_comet.yaml shrunk: CoMeT through the same loop; a run stopped after step 2 and
  resumed gives the uninterrupted run's losses, and the passkey evaluation runs chunk by chunk."""
  def config(steps: int, directory: str):
    return load_config("tiny_comet", [
        f"steps={steps}", "schedule.total_steps=4", "schedule.warmup_steps=1", "data.seq_len=256",
        "data.global_batch_size=2", "eval.batches=1",
        "eval.passkey_lengths=[256]", "logging.progress=false", "checkpoint.every_steps=2",
        f"checkpoint.dir={tmp_path / directory}", f"logging.dir={tmp_path / directory}"])

  whole = train(config(4, "whole"), devices=jax.devices()[:1])
  assert sorted(whole.losses) == [1, 2, 3, 4] and np.all(np.isfinite(list(whole.losses.values())))
  assert 0 <= whole.eval["eval/passkey_256"] <= 1 and whole.eval["eval/perplexity"] > 1
  train(config(2, "split"), devices=jax.devices()[:1])
  resumed = train(config(4, "split"), devices=jax.devices()[:1])
  assert resumed.start_step == 2
  assert {s: resumed.losses[s] for s in (3, 4)} == {s: whole.losses[s] for s in (3, 4)}

"""Evaluations (`dlax_training.evals`): adapters against the models' own logits, each evaluation's
JSON and PNG on tiny models, oracles that solve the tasks and random models that fail them, and
pictures drawn from the models' actual decisions and memory."""

from __future__ import annotations

import json
import math
import re
import struct
from collections import defaultdict

import jax
import numpy as np
import pytest
from flax import nnx

from dlax.models import LanguageModel
from dlax.models.comet import CometForCausalLM, tiny_comet_config
from dlax.models.config import tiny_config
from dlax.models.qwen3 import Qwen3Config
from dlax_training.data import ByteTokenizer, make_dataset
from dlax_training.evals import (EVALS, CometAdapter, FunctionAdapter, LMAdapter,
                                 NeedleDocuments, answer_spans, applicable, make_adapter,
                                 run_comet_memory, run_dla_boundaries, run_forgetting, run_mqar,
                                 run_passkey, run_perplexity, run_ruler, score_rows)
from dlax_training.evals.pictures import segment_ids

TOK = ByteTokenizer()
VOCAB = TOK.vocab_size                 # 261: bytes and the byte tokenizer's specials
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RANDOM_BOUND = 0.2                     # a random model must stay below this accuracy


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def lm():
  """A random-init DLA Mamba-2 LM (2 layers, 8 heads, K = 8)."""
  return LanguageModel(tiny_config("mamba2", "dla", vocab_size=VOCAB), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def lm_adapter(lm):
  # One compiled shape for every scoring eval: rows padded to 512, 128 answer slots.
  return LMAdapter(lm, length_multiple=512, min_answer_width=128)


@pytest.fixture(scope="module")
def comet():
  """A random-init tiny CoMeT (C = 16, G = 4, s = 4, Bt = 8) over the byte vocabulary."""
  backbone = Qwen3Config(vocab_size=272, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16)
  return CometForCausalLM(backbone, tiny_comet_config(first_special_id=VOCAB), rngs=nnx.Rngs(0))


def read_outputs(out_dir, name: str, result: dict, min_width: int = 300,
                 min_height: int = 200) -> dict:
  """Checks `<name>.json` (strict JSON equal to the returned result) and `<name>.png` (PNG
  signature, an IHDR of plausible size, non-empty) and returns the JSON."""
  reject = lambda constant: pytest.fail(f"{name}.json holds the non-JSON constant {constant}")
  data = json.loads((out_dir / f"{name}.json").read_text(), parse_constant=reject)
  assert data == result and data["eval"] == name
  png = (out_dir / f"{name}.png").read_bytes()
  assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
  width, height = struct.unpack(">II", png[16:24])
  assert width >= min_width and height >= min_height, (width, height)
  assert len(png) > 5000
  return data


# ------------------------------------------------------------------------------------- oracles

def text_oracle(answer):
  """A byte-level `FunctionAdapter` that reads the prefix as text: `answer(text)` returns (the
  whole answer being asked for, what of it the prefix already holds); it predicts the next byte."""
  def predict(prefix):
    full, emitted = answer(TOK.decode(prefix))
    assert full.startswith(emitted), (full, emitted)
    return full.encode()[len(emitted.encode())]
  return FunctionAdapter(predict, VOCAB, name="oracle")


def passkey_answer(text):
  key = re.search(r"The pass key is (\d+)\. Remember it", text).group(1)
  question = "What is the pass key? The pass key is"
  return " " + key, text[text.rindex(question) + len(question):]


def mqar_answer(text):
  pairs, queries = text.split("\n", 1)
  table = dict(pair.split(":") for pair in pairs.split(" "))
  key, emitted = queries.split(" ")[-1].split(":")
  return table[key], emitted


def ruler_answer(text):
  values = defaultdict(list)
  for key, value in re.findall(r"special magic numbers for ([a-z-]+) is: (\d+)\.", text):
    values[key].append(value)
  tail = text[text.rindex("?") + 1:]
  match = list(re.finditer(r"for ([a-z-]+)(?: mentioned in the provided text)? (is|are)",
                           tail))[-1]
  answer = values[match.group(1)] if match.group(2) == "are" else values[match.group(1)][:1]
  return " " + ", ".join(answer), tail[match.end():]


def copier(prefix):
  """Predicts by copying: the token after the earliest longest earlier match of the prefix's
  suffix (what an ideal induction head does); 0 when nothing matches."""
  p = np.asarray(prefix)
  t = len(p)
  candidates, length = np.arange(t - 1), 0
  while True:
    keep = candidates[(candidates - length >= 0) & (p[candidates - length] == p[t - 1 - length])]
    if not keep.size or length == t - 1:
      break
    candidates, length = keep, length + 1
  return int(p[candidates[0] + 1]) if length else 0


# ----------------------------------------------------------------------------------- adapters

def test_lm_adapter_matches_the_full_logits(lm, lm_adapter, rng):
  """Hits and NLL at answer positions equal those of `model(tokens)`, in one forward and streamed
  through the DLA cache in segments; `score_rows` (padding, batching) changes nothing."""
  ids = rng.integers(0, 256, (2, 128)).astype(np.int32)
  mask = np.zeros((2, 128), bool)
  mask[0, 40:90] = mask[1, 70:] = True
  logp = np.asarray(jax.nn.log_softmax(np.asarray(lm(ids[:, :-1]), np.float64), -1))
  nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  hit = logp.argmax(-1) == ids[:, 1:]
  for adapter in (lm_adapter, LMAdapter(lm, segment_len=32)):
    scores = adapter.score(ids, mask)
    np.testing.assert_allclose(scores.nll[:, 1:], np.where(mask[:, 1:], nll, 0), atol=2e-5)
    np.testing.assert_array_equal(scores.hit[:, 1:], hit & mask[:, 1:])
    assert not scores.hit[:, 0].any()
    exact, total, count = scores.per_row(mask)
    np.testing.assert_array_equal(count, mask.sum(1))
    np.testing.assert_allclose(total, np.where(mask[:, 1:], nll, 0).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(exact, [(hit[b] | ~mask[b, 1:]).all() for b in range(2)])
  rows = [(ids[0, :95], mask[0, :95]), (ids[1, :60], mask[1, :60]), (ids[1], mask[1]),
          (ids[0], mask[0])]
  for scores, (row_ids, row_mask) in zip(score_rows(lm_adapter, rows, batch_size=4), rows):
    assert scores.hit.shape == row_ids.shape
    row = int(row_ids[0] != ids[0, 0]) if len(row_ids) == 128 else int(len(row_ids) == 60)
    np.testing.assert_array_equal(scores.hit[1:], hit[row, :len(row_ids) - 1] & row_mask[1:])
    np.testing.assert_allclose(scores.nll[1:], np.where(row_mask[1:], nll[row, :len(row_ids) - 1],
                                                        0), atol=2e-5)


def test_comet_adapter_streams_chunks_like_the_full_forward(comet, rng):
  """CoMeT scored chunk by chunk (memory carried, later chunks skipped) equals `model(ids)`."""
  ids = rng.integers(0, 200, (4, 75)).astype(np.int32)
  mask = np.zeros((4, 75), bool)
  mask[0, 20:40] = mask[1, 50:70] = mask[2, 5:10] = True
  logp = np.asarray(jax.nn.log_softmax(np.asarray(comet(ids), np.float64)[:, :-1], -1))
  nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  scores = CometAdapter(comet, min_answer_width=16).score(ids, mask)
  np.testing.assert_allclose(scores.nll[:, 1:], np.where(mask[:, 1:], nll, 0), atol=2e-5)
  np.testing.assert_array_equal(scores.hit[:, 1:], (logp.argmax(-1) == ids[:, 1:]) & mask[:, 1:])


def test_adapter_inputs_are_checked(lm):
  adapter = make_adapter(lm)
  exact, _, count = FunctionAdapter(lambda p: 0, VOCAB).score(
      np.zeros((1, 4), np.int32), np.zeros((1, 4), bool)).per_row(np.zeros((1, 4), bool))
  assert not exact[0] and count[0] == 0                 # no answers: not exact
  assert isinstance(adapter, LMAdapter) and make_adapter(adapter) is adapter
  ids = np.zeros((1, 8), np.int32)
  with pytest.raises(ValueError, match="first token"):
    adapter.score(ids, np.ones((1, 8), bool))
  with pytest.raises(ValueError, match="token ids"):
    adapter.score(ids + VOCAB, np.zeros((1, 8), bool))
  with pytest.raises(TypeError):
    make_adapter(object())
  assert answer_spans(np.array([0, 1, 1, 0, 1, 0, 1, 1], bool)) == [(1, 3), (4, 5), (6, 8)]


def test_registry(lm_adapter, comet):
  assert set(EVALS) == {"passkey", "ruler", "mqar", "forgetting", "perplexity",
                        "dla_boundaries", "comet_memory"}
  assert "dla_boundaries" in applicable(lm_adapter)
  assert "comet_memory" in applicable(CometAdapter(comet))
  assert applicable(FunctionAdapter(lambda p: 0, VOCAB)) == [
      "passkey", "ruler", "mqar", "forgetting", "perplexity"]


# ------------------------------------------------------------------------- oracle versus random

def test_passkey_is_solved_by_an_oracle_and_failed_by_a_random_model(lm_adapter, tmp_path):
  options = dict(lengths=[300, 500], depths=[0.0, 0.5, 1.0], num_examples=4, batch_size=4)
  oracle = run_passkey(text_oracle(passkey_answer), TOK, out_dir=tmp_path / "oracle", **options)
  assert oracle["accuracy"] == [[1.0, 1.0]] * 3 and oracle["mean_accuracy"] == 1.0
  result = run_passkey(lm_adapter, TOK, out_dir=tmp_path, **options)
  data = read_outputs(tmp_path, "passkey", result)
  assert data["depths"] == [0.0, 0.5, 1.0] and data["lengths"] == [300, 500]
  assert np.shape(data["accuracy"]) == (3, 2) and len(data["tokens"]) == 2
  assert all(n <= length for n, length in zip(data["tokens"], data["lengths"]))
  assert data["mean_accuracy"] < RANDOM_BOUND
  with pytest.raises(ValueError, match="cannot hold"):
    run_passkey(lm_adapter, TOK, lengths=[100], depths=[0.5], out_dir=tmp_path)


def test_ruler_tasks_are_solved_by_an_oracle_and_failed_by_a_random_model(lm_adapter, tmp_path):
  oracle = run_ruler(text_oracle(ruler_answer), TOK, lengths=[700, 900], num_examples=3,
                     num_keys=4, num_queries=3, num_values=3, out_dir=tmp_path / "oracle")
  assert oracle["accuracy"] == {task: [1.0, 1.0] for task in oracle["tasks"]}
  assert oracle["row_exact"] == oracle["accuracy"]
  result = run_ruler(lm_adapter, TOK, tasks=["single", "multi_value"], lengths=[450],
                     num_examples=4, num_values=2, batch_size=4, out_dir=tmp_path)
  data = read_outputs(tmp_path, "ruler", result)
  assert data["tasks"] == ["single", "multi_value"] and data["lengths"] == [450]
  assert max(data["accuracy"]["single"] + data["accuracy"]["multi_value"]) < RANDOM_BOUND


def test_ruler_documents_are_deterministic_and_hold_their_needles():
  for task in ("single", "multi_key", "multi_query", "multi_value"):
    documents = NeedleDocuments(task, length=800, tokenizer=TOK, num_keys=4, num_queries=2,
                                num_values=3, seed=5)
    assert documents[1] == NeedleDocuments(task, length=800, tokenizer=TOK, num_keys=4,
                                           num_queries=2, num_values=3, seed=5)[1]
    needles, _, asked, answers = documents.sample(1)
    ids, labels = TOK.encode_segments(documents[1])
    assert len(ids) <= 800 and len(ids) > 800 - 100
    assert len(answer_spans(labels)) == len(answers)
    assert len(needles) == {"single": 1, "multi_key": 4, "multi_query": 4, "multi_value": 3}[task]
    assert len(asked) == (2 if task == "multi_query" else 1)
    text = TOK.decode(ids)
    assert all(f"numbers for {k} is: {v}." in text for k, v in needles)


def test_mqar_is_solved_by_an_oracle_and_failed_by_a_random_model(lm_adapter, tmp_path):
  options = dict(num_pairs=[8, 16], num_examples=4, batch_size=4)
  oracle = run_mqar(text_oracle(mqar_answer), TOK, out_dir=tmp_path / "oracle", **options)
  assert oracle["accuracy"] == [1.0, 1.0] and oracle["row_exact"] == [1.0, 1.0]
  result = run_mqar(lm_adapter, TOK, out_dir=tmp_path, **options)
  data = read_outputs(tmp_path, "mqar", result)
  assert data["num_pairs"] == [8, 16] and data["tokens"][0] < data["tokens"][1]
  assert max(data["accuracy"]) < RANDOM_BOUND and data["chance"] == 0.01


def test_forgetting_curve_of_a_copier_and_of_a_random_model(lm_adapter, tmp_path):
  options = dict(distances=[8, 16, 24, 64], num_examples=4, batch_size=4)
  oracle = run_forgetting(FunctionAdapter(copier, VOCAB, name="copier"), TOK,
                          out_dir=tmp_path / "oracle", **options)
  assert oracle["accuracy"] == [1.0] * 4
  assert [(b["lo"], b["hi"], b["accuracy"]) for b in oracle["buckets"]] == [
      (8, 16, 1.0), (16, 32, 1.0), (64, 128, 1.0)]
  assert oracle["tokens_scored"] == [4 * (n - 1) for n in (8, 16, 24, 64)]
  result = run_forgetting(lm_adapter, TOK, out_dir=tmp_path, **options)
  data = read_outputs(tmp_path, "forgetting", result)
  assert data["alphabet_size"] == 258 and data["chance"] == pytest.approx(1 / 258)
  accuracy = np.array(data["accuracy"])
  assert accuracy.max() < 0.05 and abs(accuracy.mean() - data["chance"]) < 0.02


# ------------------------------------------------------------------------------ perplexity

def test_perplexity_is_the_mean_loss_of_the_held_out_rows(lm_adapter, tmp_path):
  """The loss and its per-position curve are the means of the per-token NLL (which the adapter
  test ties to the model's logits) over the corpus's validation rows."""
  result = run_perplexity(lm_adapter, TOK, seq_len=127, batch_size=2, batches=1, bins=16,
                          out_dir=tmp_path)
  data = read_outputs(tmp_path, "perplexity", result)
  with make_dataset("embedded", split="validation", seq_len=127, global_batch_size=2,
                    shuffle=False, prefetch=0) as batches:
    batch = next(iter(batches))
  mask = batch["loss_mask"]
  answers = np.concatenate([np.zeros((2, 1), bool), mask], axis=1)
  nll = lm_adapter.score(batch["tokens"], answers).nll[:, 1:]
  assert data["tokens"] == mask.sum()
  assert data["loss"] == pytest.approx(nll[mask].mean(), abs=1e-5)
  assert data["perplexity"] == pytest.approx(math.exp(data["loss"]))
  assert abs(data["loss"] - math.log(VOCAB)) < 0.5          # random init: about uniform
  curve = data["per_position"]
  assert len(curve["loss"]) == 16 and curve["start"][0] == 0 and curve["end"][-1] == 127
  per_bin = [nll[:, a:b][mask[:, a:b]].mean() for a, b in zip(curve["start"], curve["end"])]
  np.testing.assert_allclose(curve["loss"], per_bin, atol=1e-5)


# --------------------------------------------------------------------------------- pictures

def test_dla_picture_draws_the_model_decisions(lm, lm_adapter, tmp_path):
  """Boundaries and merges in the picture are those the model takes: their counts equal the
  model's own DLA metrics on the same text, and every boundary opens one coloured segment."""
  result = run_dla_boundaries(lm_adapter, TOK, num_tokens=96, out_dir=tmp_path)
  data = read_outputs(tmp_path, "dla_boundaries", result, min_width=800)
  t = data["tokens"]
  assert t == 96 and len(data["token_text"]) == 96 and data["text"].startswith("Chapter 1")
  ids = TOK.encode(data["text"])[None]
  _, metrics = lm(ids, return_metrics=True)
  boundaries = np.array([[len(b) for b in layer] for layer in data["boundaries"]])
  merges = np.array([[len(m) for m in layer] for layer in data["merges"]])
  assert boundaries.shape == (2, 8) and merges.sum() > 0
  np.testing.assert_allclose(boundaries, np.asarray(metrics["boundary_rate"]) * t, atol=1e-3)
  np.testing.assert_allclose(merges, np.asarray(metrics["merges"]), atol=1e-3)
  for layer in range(2):
    for head in range(8):
      opened = np.zeros(t, bool)
      opened[data["boundaries"][layer][head]] = True
      segments = segment_ids(opened)
      runs = 1 + np.count_nonzero(np.diff(segments))
      assert data["num_segments"][layer][head] == runs == opened.sum() + (not opened[0])
      assert all(0 <= i < data["capacity"] - 1 for _, i in data["merges"][layer][head])
      assert data["max_slots"][layer][head] <= data["capacity"]
  with pytest.raises(ValueError, match="multistate='dla'"):
    run_dla_boundaries(LanguageModel(tiny_config("attention", vocab_size=VOCAB),
                                     rngs=nnx.Rngs(0)), TOK, out_dir=tmp_path)


def test_comet_picture_draws_the_model_memory(comet, tmp_path):
  """Gates lie in (0, 1) and are blank on the first chunk only; the FIFO after the last chunk
  is the model's own final memory (`forward_chunks`)."""
  result = run_comet_memory(CometAdapter(comet), TOK, num_tokens=100, out_dir=tmp_path)
  data = read_outputs(tmp_path, "comet_memory", result, min_width=600)
  assert data["chunks"] == 7 and data["tokens"] == 100 and data["layers"] == [0, 1]
  gates = np.array(data["gates"], dtype=float)                      # [L, N, G], None -> nan
  assert gates.shape == (2, 7, 4)
  assert np.isnan(gates[:, 0]).all() and np.isfinite(gates[:, 1:]).all()
  assert ((gates[:, 1:] > 0) & (gates[:, 1:] < 1)).all()
  ids = TOK.encode(data["text"])[None]
  _, (memory, _) = comet.forward_chunks(comet.layout(ids, layout="uniform"))
  norms = np.linalg.norm(np.asarray(memory.Q, np.float64)[:, 0], axis=-1)   # [L, Bt]
  n_temp = np.asarray(memory.n_temp)[:, 0]
  np.testing.assert_array_equal(np.array(data["fifo_size"])[:, -1], n_temp)
  last = np.array(data["fifo_norm"], dtype=float)[:, -1]                     # [L, Bt]
  live = np.arange(8) >= 8 - n_temp[:, None]
  np.testing.assert_allclose(last[live], norms[live], rtol=1e-5)
  assert np.isnan(last[~live]).all()
  sources = np.array(data["fifo_source_chunk"])                              # [N, Bt]
  assert sources.shape == (7, 8) and (sources[-1][live[0]] >= 0).all()
  assert all((np.diff(row[row >= 0]) >= 0).all() for row in sources)        # oldest first


def test_comet_passkey_streams_long_rows(comet, tmp_path):
  """A CoMeT passkey grid over 16-token chunks (up to 32 chunks) writes its results."""
  result = run_passkey(CometAdapter(comet, min_answer_width=16), TOK, lengths=[256, 512],
                       depths=[0.0, 1.0], num_examples=2, out_dir=tmp_path)
  data = read_outputs(tmp_path, "passkey", result)
  assert np.shape(data["accuracy"]) == (2, 2) and data["mean_accuracy"] < RANDOM_BOUND

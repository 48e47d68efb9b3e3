"""`dlax generate`: a saved tiny CoMeT folder, a tokenizer.json built here, prompt files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from comet_reference import random_tokens, tiny_model
from dlax.cli import main
from dlax.models.comet import CometForCausalLM

tokenizers = pytest.importorskip("tokenizers")


def _word_tokenizer(path, n_words: int = 240):
  """Word-level tokenizer: "w{i}" ↔ id i (the tiny model's text ids)."""
  vocab = {f"w{i}": i for i in range(n_words)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture
def saved_model(rng, tmp_path):
  model = tiny_model(rng)
  model.save_pretrained(tmp_path / "model")
  _word_tokenizer(tmp_path / "model")
  return tmp_path / "model"


def _run(capsys, *args) -> list[dict]:
  assert main(["generate", *map(str, args), "--json", "--dtype", "float32"]) == 0
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_generate_text_prompts_match_the_api(rng, saved_model, tmp_path, capsys):
  prompts = [random_tokens(rng, n) for n in (21, 6)]
  (tmp_path / "prompts.txt").write_text(
      "\n".join(" ".join(f"w{i}" for i in p) for p in prompts) + "\n")
  results = _run(capsys, "--model", saved_model, "--prompt-file", tmp_path / "prompts.txt",
                 "--per-line", "--max-new-tokens", 7)
  expected = CometForCausalLM.from_pretrained(saved_model).generate(prompts, 7)
  assert [r["token_ids"] for r in results] == expected.tolist()
  assert [r["text"] for r in results] == [" ".join(f"w{i}" for i in row) for row in expected]


def test_generate_id_prompts(rng, saved_model, tmp_path, capsys):
  prompt = random_tokens(rng, 35)
  (tmp_path / "ids.txt").write_text(" ".join(map(str, prompt)))
  results = _run(capsys, "--model", saved_model, "--prompt-file", tmp_path / "ids.txt", "--ids",
                 "--max-new-tokens", 5, "--temperature", 0.8, "--top-p", 0.9, "--seed", 1)
  expected = CometForCausalLM.from_pretrained(saved_model).generate(
      [prompt], 5, temperature=0.8, top_p=0.9, seed=1)
  assert results[0]["token_ids"] == expected[0].tolist()
  assert np.all(np.asarray(results[0]["token_ids"]) < 256)


def test_generate_errors_are_clear(saved_model, tmp_path, capsys):
  (tmp_path / "p.txt").write_text("w1 w2")
  with pytest.raises(SystemExit, match="does not exist"):
    main(["generate", "--model", str(saved_model), "--prompt-file", str(tmp_path / "none.txt")])
  with pytest.raises(SystemExit, match="not whitespace-separated ids"):
    main(["generate", "--model", str(saved_model), "--prompt-file", str(tmp_path / "p.txt"),
          "--ids"])
  (saved_model / "tokenizer.json").unlink()
  with pytest.raises(SystemExit, match="no tokenizer.json"):
    main(["generate", "--model", str(saved_model), "--prompt-file", str(tmp_path / "p.txt")])
  (tmp_path / "ids.txt").write_text("1 2 3")
  with pytest.raises(SystemExit, match="does not exist"):
    main(["generate", "--model", str(tmp_path / "missing"), "--prompt-file",
          str(tmp_path / "ids.txt"), "--ids"])

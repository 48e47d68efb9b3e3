"""Qwen3 against `transformers` (run in .venv-torch through `driver.py`): logits, save/load
round trips (single file and sharded with an index) in both directions."""

import json
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from dlax.convert import read_weights
from dlax.models.qwen3 import Qwen3ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "driver.py")
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
            rms_norm_eps=1e-6)
CASES = {"tied": (True, None), "untied": (False, None), "sharded": (False, "40KB")}


def _run_driver(jobs, workdir):
  if not os.path.exists(TORCH_PYTHON):
    pytest.fail(f"the torch environment {TORCH_PYTHON} does not exist: run scripts/torch_env.sh "
                "(`make test` runs it)", pytrace=False)
  path = os.path.join(workdir, f"jobs{len(os.listdir(workdir))}.json")
  with open(path, "w") as f:
    json.dump(jobs, f)
  done = subprocess.run([TORCH_PYTHON, DRIVER, path], capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, f"driver failed:\n{done.stderr[-4000:]}"


def _dlax_logits(model_dir, ids, mask=None):
  model = Qwen3ForCausalLM.from_pretrained(model_dir)
  return np.asarray(model(jnp.asarray(ids, jnp.int32),
                          None if mask is None else jnp.asarray(mask, jnp.int32)))


def _rel_err(actual, expected) -> float:
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """HF-made folders, their transformers logits, dlax re-saves and transformers' logits of
  those; all torch work in two driver runs."""
  work = str(tmp_path_factory.mktemp("qwen3_parity"))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, TINY["vocab_size"], size=(2, 9))
  mask = np.ones_like(ids)
  mask[1, :3] = 0                                       # left padding
  np.save(f"{work}/ids.npy", ids)
  np.save(f"{work}/mask.npy", mask)
  jobs = []
  for seed, (name, (tied, shard)) in enumerate(CASES.items()):
    jobs += [dict(op="create", config=dict(TINY, tie_word_embeddings=tied), seed=seed,
                  out=f"{work}/hf_{name}", max_shard_size=shard),
             dict(op="logits", model=f"{work}/hf_{name}", ids=f"{work}/ids.npy",
                  out=f"{work}/hf_{name}.npy")]
  jobs.append(dict(op="logits", model=f"{work}/hf_untied", ids=f"{work}/ids.npy",
                   mask=f"{work}/mask.npy", out=f"{work}/hf_masked.npy"))
  _run_driver(jobs, work)
  jobs = []
  for name, (_, shard) in CASES.items():
    model = Qwen3ForCausalLM.from_pretrained(f"{work}/hf_{name}")
    model.save_pretrained(f"{work}/dlax_{name}", max_shard_size=shard and "20KB")
    jobs.append(dict(op="logits", model=f"{work}/dlax_{name}", ids=f"{work}/ids.npy",
                     out=f"{work}/dlax_{name}.npy"))
  _run_driver(jobs, work)
  return work, ids, mask


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(hf, name):
  work, ids, _ = hf
  assert _rel_err(_dlax_logits(f"{work}/hf_{name}", ids), np.load(f"{work}/hf_{name}.npy")) \
      <= 1e-5


def test_padding_mask_matches_transformers(hf):
  work, ids, mask = hf
  ours, theirs = _dlax_logits(f"{work}/hf_untied", ids, mask), np.load(f"{work}/hf_masked.npy")
  real = mask.astype(bool)
  assert _rel_err(ours[real], theirs[real]) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_save_is_bit_identical(hf, name):
  work, _, _ = hf
  original, saved = read_weights(f"{work}/hf_{name}"), read_weights(f"{work}/dlax_{name}")
  assert sorted(saved) == sorted(original)
  for key, tensor in original.items():
    assert saved[key].dtype == tensor.dtype and saved[key].tobytes() == tensor.tobytes(), key
  with open(f"{work}/hf_{name}/config.json") as f, open(f"{work}/dlax_{name}/config.json") as g:
    assert json.load(g) == json.load(f)


@pytest.mark.parametrize("name", CASES)
def test_transformers_loads_dlax_save(hf, name):
  work, _, _ = hf
  assert _rel_err(np.load(f"{work}/dlax_{name}.npy"), np.load(f"{work}/hf_{name}.npy")) <= 1e-6


def test_sharded_folders_have_an_index(hf):
  work, _, _ = hf
  for folder in ("hf_sharded", "dlax_sharded"):
    files = os.listdir(f"{work}/{folder}")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) > 1

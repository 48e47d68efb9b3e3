"""`dlax.convert.lm_export` against `transformers` (torch side in .venv-torch through `driver.py`).

Every `LanguageModel` family is exported, loaded with `AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)` on CPU, and its fp32 logits compared with JAX's; the folders re-import
into bit-identical parameters. Parameters are perturbed away from their init (random norm
scales, λ scales L ~ U(±20), Mamba-2 Δ biases of order 1) so that every path, the λ readout
by rank or level included, moves the logits. The DLA models have small caches, so boundaries
and capacity merges really happen (asserted on the JAX side); one driver run does all the torch
work.
"""

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.convert import read_weights, write_safetensors
from dlax.convert.lm_export import (MODELING_DIR, MODELING_FILES, export_lm, import_lm,
                                    read_lm_config)
from dlax.layers.multistate import DLAConfig, LogLinearConfig
from dlax.models import AttentionConfig, LanguageModel, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCH_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "driver.py")
BATCH, LENGTH = 2, 37                  # 37 is not a multiple of the chunk size 16
FAMILIES = {
    "transformer": tiny_config(
        "attention", tie_embeddings=True,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)),
    "mamba2": tiny_config("mamba2"),
    "gated_delta": tiny_config("gated_delta"),
    "dla_mamba2": tiny_config("mamba2", "dla", dla=DLAConfig(capacity=3)),
    "dla_gated_delta": tiny_config(
        "gated_delta", "dla", dla=DLAConfig(capacity=4, num_lambda=3, tau=0.3, score_ref="total")),
    "log_linear_mamba2": tiny_config("mamba2", "log_linear"),
    "log_linear_gated_delta": tiny_config("gated_delta", "log_linear",
                                          log_linear=LogLinearConfig(num_levels=4)),
}
FAMILIES = {name: dataclasses.replace(c, init_std=0.1) for name, c in FAMILIES.items()}
DLA_FAMILIES = ("dla_mamba2", "dla_gated_delta")
# dla_mamba2's folder read with other decisions: K = 4 (fewer merges; Kλ stays 3) or τ = 0.7.
MUTANTS = {"dla_mamba2_capacity4": dict(capacity=4, num_lambda=3),
           "dla_mamba2_tau07": dict(tau=0.7)}


def _run_driver(jobs, workdir):
  if not os.path.exists(TORCH_PYTHON):
    pytest.fail(f"the torch environment {TORCH_PYTHON} does not exist: run scripts/torch_env.sh "
                "(`make test` runs it)", pytrace=False)
  path = os.path.join(workdir, "jobs.json")
  with open(path, "w") as f:
    json.dump(jobs, f)
  env = dict(os.environ, HF_MODULES_CACHE=os.path.join(workdir, "hf_modules"),
             HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
  done = subprocess.run([TORCH_PYTHON, DRIVER, path], capture_output=True, text=True,
                        timeout=600, env=env)
  assert done.returncode == 0, f"driver failed:\n{done.stderr[-4000:]}"


def _perturb(model: LanguageModel, rng: np.random.Generator) -> None:
  """Moves the parameters that init leaves at constants (or near-constant λ) to random values."""
  state = nnx.state(model, nnx.Param)
  mamba2 = model.config.mixer == "mamba2"

  def change(path, a):
    names = [getattr(p, "key", None) for p in path]
    kind = None
    if names[-1] == "lam_scale":
      kind = rng.uniform(-20.0, 20.0, a.shape)
    elif names[-1] == "weight" and any(n is not None and "norm" in n for n in names):
      kind = rng.uniform(0.5, 1.5, a.shape)
    elif names[-1] == "D":
      kind = rng.uniform(0.0, 0.5, a.shape)
    elif names[-1] == "dt_bias" and mamba2:           # Mamba-2: Δ = softplus(dt + b) ~ 0.1..0.7
      kind = rng.uniform(-2.0, 0.0, a.shape)
    return a if kind is None else jnp.asarray(kind, a.dtype)

  pure = jax.tree_util.tree_map_with_path(change, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def _params(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _rel_err(actual, expected) -> float:
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Per family: the model, its JAX logits and metrics, its export; torch's logits, loss and
  generations of every export (one driver run)."""
  work = str(tmp_path_factory.mktemp("lm_export"))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256, size=(BATCH, LENGTH)).astype(np.int32)
  np.save(f"{work}/ids.npy", ids)
  results, jobs = {}, []
  for seed, (name, config) in enumerate(FAMILIES.items()):
    model = LanguageModel(config, rngs=nnx.Rngs(seed))
    _perturb(model, np.random.default_rng(100 + seed))
    logits, metrics = model(jnp.asarray(ids), return_metrics=True)
    folder = f"{work}/{name}"
    export_lm(model, folder)
    results[name] = dict(model=model, logits=np.asarray(logits), folder=folder,
                         metrics=jax.tree.map(np.asarray, metrics))
    jobs.append(dict(op="auto_lm", model=folder, ids=f"{work}/ids.npy",
                     out=f"{folder}.logits.npy", loss=f"{folder}.loss.npy",
                     generate=f"{folder}.generate.npy" if name == "dla_gated_delta" else None))
  for mutant, dla in MUTANTS.items():
    shutil.copytree(f"{work}/dla_mamba2", f"{work}/{mutant}")
    with open(f"{work}/{mutant}/config.json") as f:
      config = json.load(f)
    config["dla"].update(dla)
    with open(f"{work}/{mutant}/config.json", "w") as f:
      json.dump(config, f)
    jobs.append(dict(op="auto_lm", model=f"{work}/{mutant}", ids=f"{work}/ids.npy",
                     out=f"{work}/{mutant}.logits.npy"))
  export_lm(results["transformer"]["model"], f"{work}/transformer_bf16", dtype="bfloat16")
  jobs.append(dict(op="auto_lm", model=f"{work}/transformer_bf16", ids=f"{work}/ids.npy",
                   out=f"{work}/transformer_bf16.logits.npy", dtype="bfloat16"))
  _run_driver(jobs, work)
  return work, ids, results


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_logits_match_jax(exported, name):
  work, _, results = exported
  torch_logits = np.load(f"{results[name]['folder']}.logits.npy")
  assert torch_logits.dtype == np.float32 and torch_logits.shape == (BATCH, LENGTH, 256)
  assert _rel_err(torch_logits, results[name]["logits"]) <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_loss_is_next_token_cross_entropy(exported, name):
  _, ids, results = exported
  logits = results[name]["logits"].astype(np.float64)
  logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  expected = -np.mean(np.take_along_axis(np.asarray(logp)[:, :-1], ids[:, 1:, None], -1))
  assert float(np.load(f"{results[name]['folder']}.loss.npy")) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", DLA_FAMILIES)
def test_dla_models_make_boundaries_and_merges(exported, name):
  metrics = exported[2][name]["metrics"]
  heads = 8 if FAMILIES[name].mixer == "mamba2" else 2
  assert metrics["merges"].shape == (2, heads)                      # [layers, heads]
  assert np.all(metrics["merges"].sum(axis=1) > 0)                 # every layer merges
  rate = metrics["boundary_rate"]
  assert np.all(rate.min(axis=1) < 1) and np.all(rate.max(axis=1) > 1 / LENGTH)


@pytest.mark.parametrize("mutant", MUTANTS)
def test_other_dla_decisions_change_the_logits(exported, mutant):
  """The parity test can fail: dla_mamba2's weights read with other merges (K = 4) or other
  boundaries (τ = 0.7) are far from the JAX logits."""
  work, _, results = exported
  logits = np.load(f"{work}/{mutant}.logits.npy")
  assert _rel_err(logits, results["dla_mamba2"]["logits"]) > 1e-3      # 10× the tolerance


def test_generate_continues_with_the_jax_argmax(exported):
  _, ids, results = exported
  generated, stepped = np.load(f"{results['dla_gated_delta']['folder']}.generate.npy")
  np.testing.assert_array_equal(generated, stepped)
  prompt = LENGTH // 2
  np.testing.assert_array_equal(generated[:, :prompt], ids[:, :prompt])
  first = np.argmax(results["dla_gated_delta"]["logits"][:, prompt - 1], axis=-1)
  np.testing.assert_array_equal(generated[:, prompt], first)


@pytest.mark.parametrize("name", FAMILIES)
def test_reimport_is_bit_identical(exported, name):
  model, folder = exported[2][name]["model"], exported[2][name]["folder"]
  back = import_lm(folder)
  assert back.config == model.config
  original, restored = _params(model), _params(back)
  assert jax.tree.structure(original) == jax.tree.structure(restored)
  for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_folder_layout(exported):
  _, _, results = exported
  for name, result in results.items():
    folder, config = result["folder"], FAMILIES[name]
    assert sorted(os.listdir(folder)) == sorted(["config.json", "model.safetensors",
                                                 *MODELING_FILES])
    with open(f"{folder}/config.json") as f:
      hf = json.load(f)
    assert hf["model_type"] == "dlax" and hf["architectures"] == ["DlaxForCausalLM"]
    assert hf["auto_map"] == {"AutoConfig": "configuration_dlax.DlaxConfig",
                              "AutoModelForCausalLM": "modeling_dlax.DlaxForCausalLM"}
    assert hf["dtype"] == "float32" and hf["compute_dtype"] == config.dtype
    assert hf["mixer"] == config.mixer and hf["multistate"] == config.multistate
    assert hf[config.mixer] == dataclasses.asdict(getattr(config, config.mixer))
    tensors = read_weights(folder)
    assert ("lm_head.weight" in tensors) == (not config.tie_embeddings)
    assert tensors["model.embed_tokens.weight"].shape == (256, 64)
    per_layer = [k for k in tensors if k.startswith("model.layers.")]
    assert {int(k.split(".")[2]) for k in per_layer} == {0, 1}
    assert len(per_layer) == 2 * len([k for k in per_layer if k.startswith("model.layers.0.")])
    if config.mixer == "mamba2":
      assert tensors["model.layers.1.mixer.conv.weight"].shape == (160, 1, 4)
      assert tensors["model.layers.1.mixer.in_proj.weight"].shape[1] == 64


def test_bfloat16_export(exported):
  work, _, results = exported
  folder = f"{work}/transformer_bf16"
  tensors = read_weights(folder)
  assert {str(a.dtype) for a in tensors.values()} == {"bfloat16"}
  back = import_lm(folder)
  for a, b in zip(jax.tree.leaves(_params(results["transformer"]["model"])),
                  jax.tree.leaves(_params(back))):
    assert b.dtype == np.float32 and np.array_equal(a.astype(jnp.bfloat16).astype(np.float32), b)
  bf16_logits = np.load(f"{work}/transformer_bf16.logits.npy")
  assert _rel_err(bf16_logits, results["transformer"]["logits"]) < 5e-2


def test_bfloat16_export_keeps_decay_parameters_in_fp32(exported, tmp_path):
  export_lm(exported[2]["dla_mamba2"]["model"], tmp_path, dtype="bfloat16")
  tensors = read_weights(tmp_path)
  for name, a in tensors.items():
    kept = name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias", "lam_scale")
    assert str(a.dtype) == ("float32" if kept else "bfloat16"), name


def test_sharded_export_round_trips(exported, tmp_path):
  model = exported[2]["log_linear_gated_delta"]["model"]
  export_lm(model, tmp_path, max_shard_size="40KB")
  files = os.listdir(tmp_path)
  assert "model.safetensors.index.json" in files and "model.safetensors" not in files
  for a, b in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(_params(import_lm(tmp_path)))):
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------- errors

@pytest.fixture
def folder(exported, tmp_path):
  """A fresh copy of the gated_delta export to break."""
  path = tmp_path / "model"
  shutil.copytree(exported[2]["gated_delta"]["folder"], path)
  return path


def _edit_config(folder, edit):
  with open(folder / "config.json") as f:
    config = json.load(f)
  edit(config)
  with open(folder / "config.json", "w") as f:
    json.dump(config, f)


def test_missing_folder_or_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    import_lm(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"):
    import_lm(tmp_path)


def test_corrupt_config(folder):
  (folder / "config.json").write_text("{ not json")
  with pytest.raises(ValueError, match="corrupt JSON"):
    import_lm(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(model_type="qwen3"), "not a dlax export"),
    (lambda c: c.pop("model_type"), "not a dlax export"),
    (lambda c: c.pop("d_model"), "lacks the field 'd_model'"),
    (lambda c: c.update(mixer="rnn"), "mixer must be one of"),
    (lambda c: c["gated_delta"].update(heads=3), "unknown fields"),
    (lambda c: c.update(dla=[]), "must be an object"),
])
def test_config_that_is_not_a_valid_dlax_export(folder, edit, match):
  _edit_config(folder, edit)
  with pytest.raises(ValueError, match=match):
    read_lm_config(folder)


def test_missing_or_corrupt_weights(folder):
  weights = folder / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="not a valid safetensors file"):
    import_lm(folder)
  weights.unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    import_lm(folder)


@pytest.mark.parametrize("change, error, match", [
    (lambda t: t.pop("model.layers.1.mixer.q_conv.weight"), KeyError, "missing tensors"),
    (lambda t: t.update({"model.layers.2.mlp_norm.weight": np.ones(64, np.float32)}),
     ValueError, "unexpected tensors"),
    (lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)}), ValueError,
     "model.norm.weight has shape"),
])
def test_weights_that_do_not_match_the_config(folder, change, error, match):
  tensors = read_weights(folder)
  change(tensors)
  write_safetensors(folder / "model.safetensors", tensors)
  with pytest.raises(error, match=match):
    import_lm(folder)


def test_export_rejects_bad_arguments(exported, tmp_path):
  with pytest.raises(ValueError, match="export dtype"):
    export_lm(exported[2]["mamba2"]["model"], tmp_path, dtype="float16")
  with pytest.raises(TypeError, match="LanguageModel"):
    export_lm(object(), tmp_path)


# ------------------------------------------------------------------------------- packaging

def test_modeling_files_are_pure_torch_and_ship_as_package_modules():
  allowed = {"__future__", "math", "torch", "transformers"}
  for name in MODELING_FILES:
    with open(os.path.join(MODELING_DIR, name)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        assert {a.name.split(".")[0] for a in node.names} <= allowed, (name, ast.dump(node))
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        assert node.module.split(".")[0] in allowed, (name, node.module)
  # setup.py ships every package under dlax/ (find_packages), .py modules included.
  for package in ("dlax/convert", "dlax/convert/torch_modeling"):
    assert os.path.isfile(os.path.join(ROOT, package, "__init__.py"))


def test_dlax_never_imports_the_torch_modeling_files():
  code = ("import sys, dlax, dlax.cli, dlax.convert, dlax.convert.lm_export, dlax.models; "
          "bad = [m for m in sys.modules if m == 'torch' or m.endswith(('modeling_dlax', "
          "'configuration_dlax'))]; assert not bad, bad")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-2000:]

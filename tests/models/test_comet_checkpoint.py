"""CoMeT checkpoints (spec §3, §4, §12): official folders, plain HF Qwen3 folders, embedding
resize and memory init, against §15 properties 13 and 15. Official folders are also written
directly with numpy from the §12.1 table, so the importer is not only checked against itself."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dlax.convert import read_weights, write_weights
from dlax.models.comet import CometConfig, tiny_comet_config
from dlax.models.comet.checkpoint import (export_official, import_official, load_comet,
                                          resize_embedding, resized_vocab_size, save_comet)
from dlax.models.comet.model import CometForCausalLM
from dlax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

F64 = jnp.float64
BACKBONE = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4)
D, L = BACKBONE.hidden_size, BACKBONE.num_hidden_layers
VARIANTS = {"full": {}, "no_global": {"global_mem_size": 0}, "no_temp": {"temp_beacon_stride": -1},
            "neither": {"global_mem_size": 0, "temp_beacon_stride": -1}}


# --------------------------------------------------------------------------------- helpers

def _spec_shapes(comet: CometConfig, backbone: Qwen3Config = BACKBONE) -> dict:
  """§12.1's key table written out for a config (tied lm_head omitted)."""
  c = backbone
  d, q, kv, i = c.hidden_size, c.num_attention_heads * c.head_dim, \
      c.num_key_value_heads * c.head_dim, c.intermediate_size
  shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
  for n in range(c.num_hidden_layers):
    inner, outer = f"model.layers.{n}.inner_layer.", f"model.layers.{n}."
    shapes.update({
        inner + "input_layernorm.weight": (d,), inner + "post_attention_layernorm.weight": (d,),
        inner + "self_attn.q_proj.weight": (q, d), inner + "self_attn.k_proj.weight": (kv, d),
        inner + "self_attn.v_proj.weight": (kv, d), inner + "self_attn.o_proj.weight": (d, q),
        inner + "self_attn.q_norm.weight": (c.head_dim,),
        inner + "self_attn.k_norm.weight": (c.head_dim,),
        inner + "mlp.gate_proj.weight": (i, d), inner + "mlp.up_proj.weight": (i, d),
        inner + "mlp.down_proj.weight": (d, i)})
    if comet.global_mem_size:
      shapes.update({outer + "global_memory_net.norm.weight": (d,),
                     outer + "global_memory_net.g_proj.weight": (1, 2 * d),
                     outer + "global_memory_net.o_proj.down_proj.weight": (8, d),
                     outer + "global_memory_net.o_proj.up_proj.weight": (d, 8)})
    if comet.temp_beacon_stride != -1:
      shapes.update({outer + "temp_memory_net.0.weight": (d,),
                     outer + "temp_memory_net.1.down_proj.weight": (8, d),
                     outer + "temp_memory_net.1.up_proj.weight": (d, 8)})
  return shapes


def _random(rng, shape, name, dtype):
  """Norm weights U(0.5, 1.5), everything else N(0, 0.2²)."""
  value = rng.uniform(0.5, 1.5, shape) if "norm" in name else rng.normal(0, 0.2, shape)
  return value.astype(dtype)


def _official_tensors(rng, comet, dtype=np.float32, backbone=BACKBONE) -> dict:
  return {k: _random(rng, s, k, dtype) for k, s in _spec_shapes(comet, backbone).items()}


def _official_json(comet: CometConfig, backbone=BACKBONE, **changes) -> dict:
  """A config.json as the reference's `save_pretrained` writes it (sorted keys, extra fields)."""
  c = backbone
  config = {
      "architectures": ["MemQwen3ForCausalLM"], "attention_bias": False,
      "attention_dropout": 0.0, "bos_token_id": 1, "chunk_size": comet.chunk_size,
      "eos_token_id": 7, "global_beacon_ids": list(comet.global_beacon_ids),
      "head_dim": c.head_dim, "hidden_act": "silu", "hidden_size": c.hidden_size,
      "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
      "layer_types": ["full_attention"] * c.num_hidden_layers, "max_position_embeddings": 4096,
      "max_window_layers": c.num_hidden_layers, "model_type": "qwen3",
      "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
      "num_key_value_heads": c.num_key_value_heads, "pad_token_id": 7,
      "placeholder_id": comet.placeholder_id, "rms_norm_eps": 1e-06, "rope_scaling": None,
      "rope_theta": c.rope_theta, "sliding_window": None, "temp_beacon_id": comet.temp_beacon_id,
      "temp_beacon_stride": comet.temp_beacon_stride, "temp_mem_budget": comet.temp_mem_budget,
      "tie_word_embeddings": True, "torch_dtype": "float32", "transformers_version": "4.56.1",
      "use_cache": True, "use_sliding_window": False, "vocab_size": c.vocab_size}
  return {**config, **changes}


def _write_folder(folder, tensors, config, max_shard_size=None):
  folder.mkdir(parents=True, exist_ok=True)
  write_weights(folder, tensors, max_shard_size)
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  return folder


def _official_folder(rng, folder, comet=None, dtype=np.float32, **json_changes):
  comet = comet or tiny_comet_config()
  tensors = _official_tensors(rng, comet, dtype)
  return _write_folder(folder, tensors, _official_json(comet, **json_changes)), tensors


def _random_params(rng, comet, dtype=np.float32, backbone=BACKBONE) -> dict:
  """Random parameters shaped like the model's pure dict (no model is initialised)."""
  abstract = nnx.eval_shape(lambda: CometForCausalLM(backbone, comet, rngs=nnx.Rngs(0)))
  return jax.tree_util.tree_map_with_path(
      lambda path, a: _random(rng, a.shape, jax.tree_util.keystr(path), dtype),
      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def _qwen3(params, config) -> Qwen3ForCausalLM:
  abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), dtype=F64,
                                                     param_dtype=F64))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, F64), params))
  return nnx.merge(graphdef, state)


def _pure(model) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_trees_identical(actual, expected):
  flat_a, tree_a = jax.tree.flatten(actual)
  flat_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e
  for a, e in zip(flat_a, flat_e):
    assert a.dtype == e.dtype and a.shape == e.shape and np.array_equal(a, e)


def _assert_files_identical(actual: dict, expected: dict):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    assert np.array_equal(actual[key], value), key


def _layer_nets(model, layer):
  graphdef, state = nnx.split(model.memory_nets)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))


def _config_json(folder) -> dict:
  return json.loads((folder / "config.json").read_text())


# -------------------------------------------------------------------------------- §15.13

@pytest.mark.parametrize("variant", VARIANTS)
def test_export_keys_shapes_and_config_follow_the_spec(rng, tmp_path, variant):
  comet = tiny_comet_config(**VARIANTS[variant])
  export_official(_random_params(rng, comet), BACKBONE, comet, tmp_path)
  weights = read_weights(tmp_path)
  assert {k: a.shape for k, a in weights.items()} == _spec_shapes(comet)
  assert {str(a.dtype) for a in weights.values()} == {"float32"}
  config = _config_json(tmp_path)
  assert config["architectures"] == ["MemQwen3ForCausalLM"] and config["model_type"] == "qwen3"
  assert config["global_beacon_ids"] == list(comet.global_beacon_ids)
  assert {k: config[k] for k in ("chunk_size", "placeholder_id", "temp_beacon_id",
                                 "temp_beacon_stride", "temp_mem_budget")} == \
      {"chunk_size": 16, "placeholder_id": 240, "temp_beacon_id": comet.temp_beacon_id,
       "temp_beacon_stride": comet.temp_beacon_stride, "temp_mem_budget": 8}
  assert "global_mem_size" not in config and "max_seq_length" not in config


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("variant", ["full", "neither"])
def test_import_of_export_is_bit_identical(rng, tmp_path, dtype, variant):
  comet = tiny_comet_config(**VARIANTS[variant])
  params = _random_params(rng, comet, dtype)
  export_official(params, BACKBONE, comet, tmp_path)
  imported, backbone, comet_back = import_official(tmp_path, comet)
  _assert_trees_identical(imported, params)
  assert comet_back == comet
  assert dataclasses.replace(backbone, extra={}) == BACKBONE


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_official_folder_round_trips_every_tensor_and_field(rng, tmp_path, dtype):
  """A reference-style folder (sharded, lm_head stored, an old rotary buffer) written with numpy
  is re-exported with the same tensors (lm_head and buffers dropped) and the same config.json."""
  comet = tiny_comet_config()
  tensors = _official_tensors(rng, comet, dtype)
  stored = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].copy(),
            "model.rotary_emb.inv_freq": np.arange(8, dtype=np.float32)}
  config = _official_json(comet, torch_dtype=jnp.dtype(dtype).name)
  _write_folder(tmp_path / "in", stored, config, max_shard_size=20_000)
  assert (tmp_path / "in" / "model.safetensors.index.json").exists()
  export_official(*import_official(tmp_path / "in"), tmp_path / "out")
  _assert_files_identical(read_weights(tmp_path / "out"), tensors)
  out = _config_json(tmp_path / "out")
  assert out == config and list(out) == list(config)


def test_both_backbone_spellings_import_identically(rng, tmp_path):
  comet = tiny_comet_config()
  tensors = _official_tensors(rng, comet)
  plain = {k.replace(".inner_layer.", "."): v for k, v in tensors.items()}
  assert len(plain) == len(tensors) and not any("inner_layer" in k for k in plain)
  _write_folder(tmp_path / "inner", tensors, _official_json(comet))
  _write_folder(tmp_path / "plain", plain, _official_json(comet))
  params, _, _ = import_official(tmp_path / "inner")
  _assert_trees_identical(import_official(tmp_path / "plain")[0], params)
  export_official(*import_official(tmp_path / "plain"), tmp_path / "out")
  _assert_files_identical(read_weights(tmp_path / "out"), tensors)   # inner_layer spelling


@pytest.mark.parametrize("half", ["candidate", "state"])
def test_gate_halves_act_on_candidate_then_state(rng, tmp_path, half):
  """g_proj.weight[:, :d] acts on the candidate RMSNorm_g(R) and [:, d:] on the state S."""
  comet = tiny_comet_config()
  tensors = _official_tensors(rng, comet)
  dead = slice(D, None) if half == "candidate" else slice(0, D)
  for n in range(L):
    tensors[f"model.layers.{n}.global_memory_net.g_proj.weight"][:, dead] = 0
  _write_folder(tmp_path, tensors, _official_json(comet))
  model = load_comet(tmp_path, dtype=F64, param_dtype=F64)
  x, y = (jnp.asarray(rng.normal(size=(5, D)), F64) for _ in range(2))
  for n in range(L):
    net = _layer_nets(model, n).global_net
    w = tensors[f"model.layers.{n}.global_memory_net.g_proj.weight"].astype(np.float64)[0]
    live = w[:D] if half == "candidate" else w[D:]
    for other in (x, y):
      args = (x, other) if half == "candidate" else (other, x)
      logits = np.asarray(net.gate_logits(*args))[:, 0]
      np.testing.assert_allclose(logits, np.asarray(x) @ live, rtol=1e-12, atol=1e-12)


def test_config_json_round_trips_with_G_from_the_id_list(rng, tmp_path):
  comet = CometConfig(chunk_size=16, temp_beacon_stride=4, temp_mem_budget=8, placeholder_id=240,
                      global_beacon_ids=(247, 241, 244), temp_beacon_id=250, max_seq_length=64)
  _official_folder(rng, tmp_path / "in", comet)
  model = load_comet(tmp_path / "in", dataclasses.replace(comet, max_seq_length=32))
  assert model.config.global_mem_size == 3 and model.config.max_seq_length == 32
  assert model.config.global_beacon_ids == (247, 241, 244)
  assert model.init_memory(1)[0].S.shape == (L, 1, 3, D)
  save_comet(model, tmp_path / "out")
  out, config = _config_json(tmp_path / "out"), _config_json(tmp_path / "in")
  assert out["global_beacon_ids"] == [247, 241, 244] and "global_mem_size" not in out
  assert out == config and list(out) == list(config)


# ------------------------------------------------------------------- plain HF Qwen3 → CoMeT

def _plain_folder(rng, folder, config: Qwen3Config, table=None):
  """A plain HF Qwen3 folder written by `Qwen3ForCausalLM.save_pretrained` (random weights,
  rounded to fp32); returns the float64 model."""
  abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)))
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: _random(rng, a.shape, jax.tree_util.keystr(path), np.float32),
      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  if table is not None:
    params["embedding"] = table
  model = _qwen3(params, config)
  model.save_pretrained(folder)
  return model


def test_plain_qwen3_gets_resized_embedding_and_initialised_memory(rng, tmp_path):
  """§3 resize (old rows kept, new rows = old mean + N(0, 1e-9·Cov)), §4/§15.15 init sanity."""
  v_old = 4096
  backbone = dataclasses.replace(BACKBONE, vocab_size=v_old, eos_token_id=11)
  mix = 0.1 * np.eye(D) + rng.normal(0, 0.02, (D, D))            # correlated old rows
  table = (0.5 + rng.normal(size=(v_old, D)) @ mix).astype(np.float32)
  _plain_folder(rng, tmp_path, backbone, table)
  comet = tiny_comet_config(first_special_id=4000, global_mem_size=200)   # ids up to 4201
  model = load_comet(tmp_path, comet, seed=3)
  assert model.backbone.hf_config.vocab_size == 4352 and model.backbone.hf_config.pad_token_id == 11
  embedding = np.asarray(model.backbone.embedding[...])
  assert embedding.shape == (4352, D) and np.array_equal(embedding[:v_old], table)

  old = table.astype(np.float64)
  deviation = embedding[v_old:].astype(np.float64) - old.mean(0)                # [256, d]
  white = deviation @ np.linalg.inv(np.linalg.cholesky(np.cov(old.T, bias=True))).T
  white /= np.sqrt(1e-9)                                        # ~ N(0, I) if the law is right
  assert np.abs(white.mean(0)).max() < 0.35
  assert np.abs(np.cov(white.T) - np.eye(D)).max() < 0.4
  ratio = deviation.std(0) / old.std(0)
  assert 0.8 * 3.16e-5 < ratio.mean() < 1.2 * 3.16e-5

  nets = [_layer_nets(model, n) for n in range(L)]
  x = jnp.asarray(rng.normal(size=(256, D)), jnp.float32)
  for layer in nets:
    for rla in (layer.global_net.o_proj, layer.temp_net.rla):
      rel = float(jnp.linalg.norm(rla(x) - x) / jnp.linalg.norm(x))
      assert 0.5 < rel / (0.02 ** 2 * np.sqrt(8 * D)) < 2
    for norm in (layer.global_net.norm, layer.temp_net.norm):
      assert np.all(np.asarray(norm.weight[...]) == 1)
    logits = np.asarray(layer.global_net.gate_logits(x, x[::-1]))[:, 0]
    assert 0.5 < logits.std() / (0.02 * np.sqrt(2 * D)) < 2
    gates = 1 / (1 + np.exp(-logits))
    assert abs(gates.mean() - 0.5) < 0.05 and gates.min() < 0.5 < gates.max()
  projections = np.concatenate([np.ravel(a) for path, a in jax.tree_util.tree_leaves_with_path(
      _pure(model.memory_nets)) if "kernel" in jax.tree_util.keystr(path)])
  assert 0.018 < projections.std() < 0.022 and abs(projections.mean()) < 0.002

  again = load_comet(tmp_path, comet, seed=3)
  _assert_trees_identical(_pure(again), _pure(model))
  other = _pure(load_comet(tmp_path, comet, seed=4))
  assert np.array_equal(other["backbone"]["embedding"][:v_old], table)
  assert not np.array_equal(other["backbone"]["embedding"], embedding)
  assert not np.array_equal(other["memory_nets"]["temp_net"]["rla"]["up_proj"]["kernel"],
                            _pure(model)["memory_nets"]["temp_net"]["rla"]["up_proj"]["kernel"])


def test_plain_qwen3_without_memory_matches_the_backbone(rng, tmp_path):
  """G=0, stride −1, one chunk: CoMeT logits equal the Qwen3 backbone's (weights landed right),
  on the old vocabulary columns of a resized embedding."""
  reference = _plain_folder(rng, tmp_path, BACKBONE)
  comet = tiny_comet_config(first_special_id=255, global_mem_size=0, temp_beacon_stride=-1)
  model = load_comet(tmp_path, comet, dtype=F64, param_dtype=F64)
  assert model.backbone.hf_config.vocab_size == 512 and "memory_nets" not in _pure(model)
  ids = np.asarray(rng.integers(0, 240, (2, 16)), np.int32)
  expected = reference(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(model(ids))[..., :256], expected, rtol=1e-9, atol=1e-9)


def test_sharded_save_and_hf_backbone_format(rng, tmp_path):
  comet = tiny_comet_config(first_special_id=255)
  _plain_folder(rng, tmp_path / "plain", BACKBONE)
  model = load_comet(tmp_path / "plain", comet)
  save_comet(model, tmp_path / "sharded", max_shard_size=30_000)
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "sharded" / "model.safetensors").exists()
  _assert_trees_identical(_pure(load_comet(tmp_path / "sharded")), _pure(model))

  save_comet(model, tmp_path / "hf", format="hf-backbone", dtype="bfloat16")
  config = _config_json(tmp_path / "hf")
  assert config["architectures"] == ["Qwen3ForCausalLM"] and config["vocab_size"] == 512
  assert config["torch_dtype"] == "bfloat16" and config["pad_token_id"] is None
  assert not {"global_beacon_ids", "chunk_size", "placeholder_id"} & set(config)
  weights = read_weights(tmp_path / "hf")
  assert not any("inner_layer" in k or "memory_net" in k for k in weights)
  assert {str(a.dtype) for a in weights.values()} == {"bfloat16"}
  backbone = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf")
  expected = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(np.float32),
                          _pure(model.backbone))
  _assert_trees_identical(_pure(backbone), expected)


def test_load_places_params_on_the_active_mesh(rng, tmp_path):
  _official_folder(rng, tmp_path)
  with jax.set_mesh(jax.make_mesh((1,), ("fsdp",))):
    model = load_comet(tmp_path)
  assert model.backbone.embedding[...].sharding.spec == P(None, "fsdp")
  assert model.backbone.blocks.mlp.gate.kernel[...].sharding.spec == P(None, "fsdp", None)
  assert model.memory_nets.global_net.g_proj.kernel[...].sharding.spec == P()


# ---------------------------------------------------------------------- resize / vocabulary

def test_resized_vocab_size():
  assert resized_vocab_size(CometConfig(), 151936) == 152320        # spec §3, G = 512
  assert resized_vocab_size(CometConfig(), 152320) == 152320
  assert resized_vocab_size(tiny_comet_config(), 4096) == 4096       # never shrinks
  assert resized_vocab_size(tiny_comet_config(first_special_id=300), 256) == 512
  assert resized_vocab_size(tiny_comet_config(first_special_id=250), 256) == 256   # max id 255


def test_resize_embedding_keeps_rows_and_dtype_and_is_seeded(rng):
  table = rng.normal(size=(300, 8)).astype(jnp.bfloat16)
  out = resize_embedding(table, 320, seed=1)
  assert out.dtype == table.dtype and out.shape == (320, 8)
  assert np.array_equal(out[:300], table)
  assert np.array_equal(resize_embedding(table, 320, seed=1), out)
  mean = table.astype(np.float64).mean(0)
  np.testing.assert_allclose(out[300:].astype(np.float64), np.broadcast_to(mean, (20, 8)),
                             atol=0.01)
  assert np.array_equal(resize_embedding(table, 300), table)
  with pytest.raises(ValueError, match="shrink"):
    resize_embedding(table, 299)


def test_resize_embedding_with_a_rank_deficient_table(rng):
  """Rows in a 3-dim affine subspace: the covariance is singular; the noise stays in it."""
  basis = np.linalg.qr(rng.normal(size=(16, 3)))[0]                      # [16, 3]
  table = 2.0 + rng.normal(size=(500, 3)) @ basis.T
  noise = resize_embedding(table, 600, seed=0)[500:] - table.mean(0)
  inside = noise @ basis
  assert np.isfinite(noise).all() and inside.std() > 1e-5
  assert np.abs(noise - inside @ basis.T).max() < 1e-6 * inside.std()


# ------------------------------------------------------------------------------------ errors

def _rewrite(folder, edit):
  weights = read_weights(folder)
  edit(weights)
  write_weights(folder, weights)


def test_missing_and_corrupt_files_are_reported(rng, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_comet(tmp_path / "nope")
  folder, _ = _official_folder(rng, tmp_path / "f")
  (folder / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    import_official(folder)
  (folder / "config.json").write_text("{")
  with pytest.raises(ValueError, match="corrupt JSON"):
    load_comet(folder)
  (folder / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_comet(folder)


def test_key_shape_and_lm_head_errors_name_the_key(rng, tmp_path):
  folder, _ = _official_folder(rng, tmp_path)
  memory_key = "model.layers.1.temp_memory_net.1.up_proj.weight"
  backbone_key = "model.layers.0.inner_layer.mlp.up_proj.weight"
  saved = read_weights(folder)
  for edit, error, match in [
      (lambda w: w.pop(memory_key), KeyError, memory_key),
      (lambda w: w.pop(backbone_key), KeyError, backbone_key),
      (lambda w: w.update({memory_key: np.ones((8, D), np.float32)}), ValueError,
       rf"{memory_key}: shape \(8, 64\)"),
      (lambda w: w.update({"model.layers.0.extra.weight": w[memory_key]}), ValueError,
       r"unexpected keys.*model\.layers\.0\.extra\.weight"),
      (lambda w: w.update({"lm_head.weight": w["model.embed_tokens.weight"] + 1}), ValueError,
       "lm_head.weight differs"),
      (lambda w: w.update({backbone_key.replace("inner_layer.", ""): w[backbone_key]}),
       ValueError, "both backbone spellings")]:
    _rewrite(folder, lambda w: (w.clear(), w.update(saved), edit(w)))
    with pytest.raises(error, match=match):
      load_comet(folder)


def test_config_errors(rng, tmp_path):
  comet = tiny_comet_config()
  _official_folder(rng, tmp_path)
  config = _config_json(tmp_path)
  for changes, match in [({"global_beacon_ids": None}, "global_beacon_ids"),
                         ({"vocab_size": 245}, r"< vocab_size \(245\); temp_beacon_id has 245"),
                         ({"tie_word_embeddings": False}, "tied embeddings")]:
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=match):
      import_official(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"differs from config.json in \['chunk_size'\]"):
    load_comet(tmp_path, dataclasses.replace(comet, chunk_size=32))
  model = load_comet(tmp_path)
  with pytest.raises(ValueError, match="save format"):
    save_comet(model, tmp_path / "out", format="torch")
  with pytest.raises(ValueError, match="save dtype"):
    save_comet(model, tmp_path / "out", dtype="float16")

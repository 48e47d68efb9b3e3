"""Qwen3: a float64 numpy reference of spec §2, GQA head mapping, decode cache, config and HF
folder round trips, and the importer's errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dlax.convert import params_to_hf, read_weights, write_safetensors
from dlax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from model_helpers import decode_step, forward, prefill, rel_err

TINY = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=1e4,
                   tie_word_embeddings=True)


def random_model(rng, config=TINY, dtype=jnp.float64) -> Qwen3ForCausalLM:
  """All parameters N(0, 0.3²) except norm weights U(0.5, 1.5), so every path matters."""
  model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = var[...].shape
    value = (rng.uniform(0.5, 1.5, shape) if "norm" in "/".join(map(str, path))
             else rng.normal(0, 0.3, shape))
    var[...] = jnp.asarray(value, dtype)
  return model


def hf_tensors(model) -> dict[str, np.ndarray]:
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return params_to_hf(params, model.hf_config)


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, theta):                                   # x [T, n, hd]
  t, hd = x.shape[0], x.shape[-1]
  inv_freq = theta ** (-np.arange(0, hd, 2) / hd)
  freqs = np.arange(t)[:, None] * inv_freq
  cos, sin = np.cos(np.concatenate([freqs] * 2, -1)), np.sin(np.concatenate([freqs] * 2, -1))
  rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
  return x * cos[:, None] + rot * sin[:, None]


def qwen3_reference(w, c: Qwen3Config, ids, *, norm_before_rope=True):
  """Spec §2 in float64 numpy on HF-layout tensors `w`, one sequence ids `[T]` -> `[T, V]`."""
  h, kv, hd, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
  x = w["model.embed_tokens.weight"][ids]
  t = len(ids)
  for i in range(c.num_hidden_layers):
    p = lambda name: w[f"model.layers.{i}.{name}.weight"]
    a = _rms(x, p("input_layernorm"), eps)
    q = (a @ p("self_attn.q_proj").T).reshape(t, h, hd)
    k = (a @ p("self_attn.k_proj").T).reshape(t, kv, hd)
    v = (a @ p("self_attn.v_proj").T).reshape(t, kv, hd)
    norm_q = lambda y: _rms(y, p("self_attn.q_norm"), eps)
    norm_k = lambda y: _rms(y, p("self_attn.k_norm"), eps)
    if norm_before_rope:
      q, k = _rope(norm_q(q), c.rope_theta), _rope(norm_k(k), c.rope_theta)
    else:
      q, k = norm_q(_rope(q, c.rope_theta)), norm_k(_rope(k, c.rope_theta))
    out = np.zeros((t, h, hd))
    for head in range(h):
      g = head // (h // kv)
      s = q[:, head] @ k[:, g].T * hd ** -0.5 + np.triu(np.full((t, t), -np.inf), 1)
      pr = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (pr / pr.sum(-1, keepdims=True)) @ v[:, g]
    x = x + out.reshape(t, -1) @ p("self_attn.o_proj").T
    b = _rms(x, p("post_attention_layernorm"), eps)
    gate = b @ p("mlp.gate_proj").T
    x = x + (gate / (1 + np.exp(-gate)) * (b @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
  head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
  return _rms(x, w["model.norm.weight"], eps) @ head.T


@pytest.mark.parametrize("tied", [True, False])
def test_matches_float64_reference(rng, tied):
  config = dataclasses.replace(TINY, tie_word_embeddings=tied)
  model = random_model(rng, config)
  ids = rng.integers(0, config.vocab_size, size=(2, 7))
  logits = model(jnp.asarray(ids, jnp.int32))
  assert logits.dtype == jnp.float64 and logits.shape == (2, 7, config.vocab_size)
  w = hf_tensors(model)
  for row in range(2):
    assert rel_err(logits[row], qwen3_reference(w, config, ids[row])) <= 1e-10
  # The reference is sensitive to the q/k-norm vs RoPE order.
  assert rel_err(logits[0], qwen3_reference(w, config, ids[0], norm_before_rope=False)) > 1e-3


def test_gqa_query_head_reads_kv_head_h_div_group(rng):
  model = random_model(rng)
  graphdef, state = nnx.split(model.blocks)
  layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).mixer
  hd = TINY.head_dim
  v = np.array(layer.v_proj.kernel[...])
  v[:, :hd] = 0                                         # KV head 0 carries zero values
  layer.v_proj.kernel[...] = jnp.asarray(v)
  layer.o_proj.kernel[...] = jnp.eye(TINY.hidden_size, dtype=jnp.float64)   # y = heads
  y, _ = layer(jnp.asarray(rng.normal(size=(1, 5, TINY.hidden_size)), jnp.float64))
  heads = np.abs(np.asarray(y)).reshape(5, 4, hd).max(axis=(0, 2))
  assert heads[0] == heads[1] == 0 and heads[2] > 0 and heads[3] > 0


def test_prefill_then_decode_matches_full_pass(rng):
  model = random_model(rng)
  ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(2, 8)), jnp.int32)
  full = forward(model, ids)
  logits, cache = prefill(model, ids[:, :5], max_len=8)
  steps = [logits]
  for t in range(5, 8):
    step, cache = decode_step(model, ids[:, t], cache)
    steps.append(step[:, None])
  assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-10


def test_attention_mask_hides_left_padding(rng):
  model = random_model(rng)
  ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(1, 6)), jnp.int32)
  padded = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), ids], axis=1)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)
  # Same tokens at positions 2..7 without padding: RoPE is relative, so logits agree.
  assert rel_err(model(padded, mask)[:, 2:], model(ids)) <= 1e-10


HF_V4 = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
         "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": [151645, 151643],
         "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
         "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
         "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16,
         "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
         "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
         "tie_word_embeddings": True, "torch_dtype": "bfloat16",
         "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
         "vocab_size": 151936, "some_future_field": {"a": [1, 2]}}


def test_config_round_trips_hf_dicts():
  config = Qwen3Config.from_hf_dict(HF_V4)
  assert config.rope_theta == 1e6 and config.eos_token_id == (151645, 151643)
  out = config.to_hf_dict()
  assert out == HF_V4 and list(out) == list(HF_V4)
  v5 = {k: v for k, v in HF_V4.items() if k not in ("rope_theta", "rope_scaling")}
  v5 = {**v5, "rope_parameters": {"rope_theta": 5e6, "rope_type": "default"},
        "layer_types": ["full_attention"] * 28}
  config = Qwen3Config.from_hf_dict(v5)
  assert config.rope_theta == 5e6 and config.to_hf_dict() == v5
  hash(config)


@pytest.mark.parametrize("change", [{"layer_types": ["full_attention", "sliding_attention"]},
                                    {"use_sliding_window": True, "max_window_layers": 1}])
def test_sliding_window_configs_are_rejected(change):
  with pytest.raises(ValueError, match="sliding"):
    Qwen3Config.from_hf_dict({**TINY.to_hf_dict(), **change})


def test_save_load_round_trip_and_bf16(rng, tmp_path):
  model = random_model(rng, dtype=jnp.float32)
  ids = jnp.asarray(rng.integers(0, TINY.vocab_size, size=(1, 5)), jnp.int32)
  model.save_pretrained(tmp_path / "f32", max_shard_size=4000)
  assert (tmp_path / "f32" / "model.safetensors.index.json").exists()
  assert np.array_equal(forward(Qwen3ForCausalLM.from_pretrained(tmp_path / "f32"), ids), forward(model, ids))
  model.save_pretrained(tmp_path / "bf16", dtype="bfloat16")
  weights = read_weights(tmp_path / "bf16")
  assert {str(a.dtype) for a in weights.values()} == {"bfloat16"}
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert rel_err(forward(Qwen3ForCausalLM.from_pretrained(tmp_path / "bf16"), ids), forward(model, ids)) < 0.05


def test_load_places_params_on_the_active_mesh(rng, tmp_path):
  random_model(rng, dtype=jnp.float32).save_pretrained(tmp_path)
  with jax.set_mesh(jax.make_mesh((1,), ("fsdp",))):
    model = Qwen3ForCausalLM.from_pretrained(tmp_path)
  assert model.blocks.mlp.gate.kernel[...].sharding.spec == P(None, "fsdp", None)
  assert model.embedding[...].sharding.spec == P(None, "fsdp")


@pytest.fixture
def folder(rng, tmp_path):
  random_model(rng, dtype=jnp.float32).save_pretrained(tmp_path)
  return tmp_path


def _rewrite(folder, edit):
  weights = read_weights(folder)
  edit(weights)
  write_safetensors(folder / "model.safetensors", weights, {"format": "pt"})


def test_missing_folder_and_files_are_reported(folder, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Qwen3ForCausalLM.from_pretrained(tmp_path / "nope")
  os.remove(folder / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    Qwen3ForCausalLM.from_pretrained(folder)
  os.remove(folder / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    Qwen3ForCausalLM.from_pretrained(folder)


def test_corrupt_files_are_reported(folder):
  (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(ValueError, match="not a valid safetensors"):
    Qwen3ForCausalLM.from_pretrained(folder)
  (folder / "config.json").write_text("{")
  with pytest.raises(ValueError, match="corrupt JSON"):
    Qwen3ForCausalLM.from_pretrained(folder)


def test_key_and_shape_errors_name_the_key(folder):
  key = "model.layers.1.self_attn.k_norm.weight"
  _rewrite(folder, lambda w: w.pop(key))
  with pytest.raises(KeyError, match=key):
    Qwen3ForCausalLM.from_pretrained(folder)
  _rewrite(folder, lambda w: w.update({key: np.ones(9, np.float32)}))
  with pytest.raises(ValueError, match=rf"{key}: shape \(9,\)"):
    Qwen3ForCausalLM.from_pretrained(folder)
  _rewrite(folder, lambda w: w.update({key: np.ones(8, np.float32), "extra.weight": w[key]}))
  with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
    Qwen3ForCausalLM.from_pretrained(folder)
  _rewrite(folder, lambda w: (w.pop("extra.weight"), w.update(
      {"lm_head.weight": w["model.embed_tokens.weight"] + 1})))
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    Qwen3ForCausalLM.from_pretrained(folder)

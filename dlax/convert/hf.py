"""Hugging Face Qwen3 folders <-> `Qwen3ForCausalLM` (spec §12.1).

An HF folder holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json`. PyTorch Linear weights are `[out, in]` and dlax kernels
`[in, out]`, so they are transposed; per-layer tensors are stacked on dlax's leading [L] axis.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dlax.convert.safetensors_io import read_safetensors, write_safetensors
from dlax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PLAIN_LAYER_PREFIX = "model.layers.{i}."

# (dlax path inside `blocks`, HF key suffix, transposed)
_LAYER_KEYS = (
    (("mixer_norm", "weight"), "input_layernorm.weight", False),
    (("mixer", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("mixer", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("mixer", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("mixer", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("mixer", "q_norm", "weight"), "self_attn.q_norm.weight", False),
    (("mixer", "k_norm", "weight"), "self_attn.k_norm.weight", False),
    (("mlp_norm", "weight"), "post_attention_layernorm.weight", False),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", True),
)
_GLOBAL_KEYS = (
    (("embedding",), "model.embed_tokens.weight", False),
    (("final_norm", "weight"), "model.norm.weight", False),
    (("head", "kernel"), "lm_head.weight", True),
)
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")     # non-persistent buffers of old checkpoints


# ------------------------------------------------------------------------------------- files

def read_config(path) -> dict[str, Any]:
  """`config.json` of an HF folder as a dict; clear errors for a missing folder or bad JSON."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"HF checkpoint folder {path!r} does not exist")
  file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path!r} has no {CONFIG_NAME}")
  try:
    with open(file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: corrupt JSON ({e})") from e


def read_weights(path) -> dict[str, np.ndarray]:
  """All tensors of an HF folder: `model.safetensors`, or the shards named by its index."""
  single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
  if os.path.isfile(single):
    return read_safetensors(single)
  if not os.path.isfile(index):
    raise FileNotFoundError(f"{path!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index}: corrupt index ({e!r})") from e
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    file = os.path.join(path, shard)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{index} names shard {shard!r}, which is missing")
    tensors.update(read_safetensors(file))
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise ValueError(f"{index}: keys {missing} are not in their shards")
  return tensors


def parse_size(size) -> int:
  """Bytes of an int or a string such as "5GB", "200MB", "10KiB"."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not match:
    raise ValueError(f"cannot parse max_shard_size {size!r}")
  unit = (match.group(2) or "B").upper()
  base = 1024 if "I" in unit else 1000
  return int(float(match.group(1)) * base ** "BKMG".index(unit[0]))


def write_weights(path, tensors: dict[str, np.ndarray], max_shard_size=None) -> None:
  """Writes `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` of at most
  `max_shard_size` bytes (a larger tensor gets a shard of its own) plus the index."""
  metadata = {"format": "pt"}
  if max_shard_size is None:
    write_safetensors(os.path.join(path, WEIGHTS_NAME), tensors, metadata)
    return
  limit, shards = parse_size(max_shard_size), [{}]
  for name in sorted(tensors):
    used = sum(a.nbytes for a in shards[-1].values())
    if shards[-1] and used + tensors[name].nbytes > limit:
      shards.append({})
    shards[-1][name] = tensors[name]
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(path, file), shard, metadata)
    weight_map.update(dict.fromkeys(shard, file))
  index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(path, INDEX_NAME), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)


def write_folder(path, tensors: dict[str, np.ndarray], config: dict[str, Any], *,
                 max_shard_size=None, dtype: str | None = None) -> None:
  """Writes an HF folder: the weights (`write_weights`, replacing an earlier save's weight files)
  and `config.json`, whose `dtype` (or `torch_dtype`) field is set to `dtype` when given."""
  os.makedirs(path, exist_ok=True)
  for stale in os.listdir(path):
    if stale in (WEIGHTS_NAME, INDEX_NAME) or _SHARD.fullmatch(stale):
      os.remove(os.path.join(path, stale))
  write_weights(path, tensors, max_shard_size)
  if dtype is not None:
    config = {**config, ("dtype" if "dtype" in config else "torch_dtype"): dtype}
  with open(os.path.join(path, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")


# ------------------------------------------------------------------------------------ keys

def hf_to_params(tensors: dict[str, np.ndarray], config: Qwen3Config,
                 layer_prefix: str = PLAIN_LAYER_PREFIX) -> dict[str, Any]:
  """HF tensors -> dlax's nested parameter dict (numpy, original dtypes).

  Raises KeyError for missing keys and ValueError for unexpected keys, shape mismatches and an
  `lm_head.weight` that differs from a tied embedding.
  """
  tensors = {k: v for k, v in tensors.items() if not _IGNORED.match(k)}
  expected = qwen3_shapes(config, layer_prefix)
  tied = config.tie_word_embeddings
  lm_head = tensors.pop("lm_head.weight", None) if tied else None
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise KeyError(f"checkpoint is missing keys: {missing}")
  unexpected = sorted(set(tensors) - set(expected))
  if unexpected:
    raise ValueError(f"checkpoint has unexpected keys: {unexpected}")
  for key, shape in expected.items():
    if tensors[key].shape != shape:
      raise ValueError(f"{key}: shape {tensors[key].shape} does not match the config's {shape}")
  if lm_head is not None and not np.array_equal(lm_head, tensors["model.embed_tokens.weight"]):
    raise ValueError("lm_head.weight differs from model.embed_tokens.weight, but "
                     "tie_word_embeddings is true")
  params: dict[str, Any] = {}
  for path, key, transpose in _global_keys(config):
    _set(params, path, tensors[key].T if transpose else tensors[key])
  for path, suffix, transpose in _LAYER_KEYS:
    layers = [tensors[layer_prefix.format(i=i) + suffix] for i in range(config.num_hidden_layers)]
    _set(params, ("blocks", *path), np.stack([a.T if transpose else a for a in layers]))
  return params


def params_to_hf(params: dict[str, Any], config: Qwen3Config,
                 layer_prefix: str = PLAIN_LAYER_PREFIX) -> dict[str, np.ndarray]:
  """dlax's nested parameter dict (numpy) -> HF tensors (tied lm_head omitted)."""
  out = {}
  for path, key, transpose in _global_keys(config):
    a = _get(params, path)
    out[key] = np.ascontiguousarray(a.T if transpose else a)
  for path, suffix, transpose in _LAYER_KEYS:
    stacked = _get(params, ("blocks", *path))
    for i in range(config.num_hidden_layers):
      out[layer_prefix.format(i=i) + suffix] = np.ascontiguousarray(
          stacked[i].T if transpose else stacked[i])
  return out


def qwen3_shapes(config: Qwen3Config,
                 layer_prefix: str = PLAIN_LAYER_PREFIX) -> dict[str, tuple[int, ...]]:
  """HF key -> shape for a Qwen3 config (without a tied lm_head)."""
  c = config
  d, q, kv, i = c.hidden_size, c.num_attention_heads * c.head_dim, \
      c.num_key_value_heads * c.head_dim, c.intermediate_size
  layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
           "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
           "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
           "self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,),
           "mlp.gate_proj.weight": (i, d), "mlp.up_proj.weight": (i, d),
           "mlp.down_proj.weight": (d, i)}
  shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, d)
  for n in range(c.num_hidden_layers):
    shapes.update({layer_prefix.format(i=n) + k: s for k, s in layer.items()})
  return shapes


def _global_keys(config: Qwen3Config):
  return _GLOBAL_KEYS[:2] if config.tie_word_embeddings else _GLOBAL_KEYS


def _set(tree: dict, path, value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: dict, path):
  for name in path:
    tree = tree[name]
  return tree


# ------------------------------------------------------------------------------ placement

def _active_mesh():
  mesh = jax.sharding.get_mesh()
  return None if mesh is None or mesh.empty else mesh


def load_rules():
  """Default logical-axis rules for loading: `dlax.parallel`'s table with the stacked layer axis
  replicated (`COMET_PIPELINE_RULES`: embed→fsdp, heads/mlp/vocab→tensor)."""
  from dlax.parallel.comet_pipeline import COMET_PIPELINE_RULES   # dlax.parallel imports models
  return COMET_PIPELINE_RULES


def placed_model(abstract, params, *, param_dtype, mesh=None, rules=None,
                 replicated: tuple[str, ...] = ()):
  """`abstract` (from `nnx.eval_shape`) with `params` (its nested pure dict of numpy arrays) cast to
  `param_dtype` and put on the devices: with a mesh (given, or active via `jax.set_mesh`) sharded
  by `dlax.parallel.param_shardings(..., rules or load_rules())`, the top-level subtrees named in
  `replicated` replicated; otherwise on the default device."""
  graphdef, state = nnx.split(abstract)
  mesh = mesh if mesh is not None else _active_mesh()
  if mesh is None:
    params = jax.tree.map(lambda a: jax.device_put(np.asarray(a).astype(param_dtype)), params)
  else:
    from dlax.parallel.mesh import param_shardings
    shardings = nnx.to_pure_dict(param_shardings(state, mesh, rules or load_rules()))
    for name in replicated:
      if name in shardings:
        shardings[name] = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()),
                                       shardings[name])
    params = jax.tree.map(
        lambda a, s: jax.device_put(np.asarray(a).astype(param_dtype), s), params, shardings)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------ load / save

def load_qwen3(path, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = True,
               mesh=None, rules=None) -> Qwen3ForCausalLM:
  """`Qwen3ForCausalLM` with the weights of an HF folder, cast to `param_dtype` and placed by
  `placed_model` (sharded by the logical-axis `rules` when a mesh is given or active)."""
  config = Qwen3Config.from_hf_dict(read_config(path))
  params = hf_to_params(read_weights(path), config)
  abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(
      config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, remat=remat))
  return placed_model(abstract, params, param_dtype=param_dtype, mesh=mesh, rules=rules)


def save_qwen3(model: Qwen3ForCausalLM, path, *, dtype: str = "float32",
               max_shard_size=None, layer_prefix: str = PLAIN_LAYER_PREFIX) -> None:
  """Writes `config.json` and the weights in `dtype` ("float32" or "bfloat16"), sharded with
  an index when `max_shard_size` (bytes or "200MB") is given."""
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"save dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  np_dtype = jnp.dtype(dtype)
  params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)).astype(np_dtype),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  write_folder(path, params_to_hf(params, model.hf_config, layer_prefix),
               model.hf_config.to_hf_dict(), max_shard_size=max_shard_size, dtype=dtype)

"""CoMeT checkpoints (spec §3, §4, §12): official `MemQwen3ForCausalLM` folders and plain HF Qwen3
folders <-> `CometForCausalLM`.

An official folder stores the backbone under `model.layers.{i}.inner_layer.*` (the plain Qwen3
spelling `model.layers.{i}.self_attn...` is accepted too), the memory nets under
`model.layers.{i}.{global,temp}_memory_net.*` (`memory.OFFICIAL_KEYS`) and the CoMeT fields in
`config.json`. A plain Qwen3 folder becomes a fresh CoMeT: memory nets initialised per §4, the
embedding resized per §3.

Parameters are nested dicts shaped like the model's pure dict, stacked on a leading [L] axis:
`backbone.{embedding, final_norm, blocks.*}` (see `dlax.convert.hf`) and
`memory_nets.{global_net, temp_net}.*` (absent when G = 0 / stride −1).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from dlax.convert.hf import (_get, _set, hf_to_params, params_to_hf, placed_model, qwen3_shapes,
                             read_config, read_weights, write_folder)
from dlax.models.comet.config import HF_FIELDS, CometConfig
from dlax.models.comet.memory import OFFICIAL_KEYS
from dlax.models.comet.model import CometForCausalLM, MemoryNets
from dlax.models.qwen3 import Qwen3Config

OFFICIAL_ARCHITECTURE = "MemQwen3ForCausalLM"
INNER_LAYER_PREFIX = "model.layers.{i}.inner_layer."
FORMATS = ("official", "hf-backbone")
SAVE_DTYPES = ("float32", "bfloat16")
VOCAB_MULTIPLE = 256    # the embedding is resized to a multiple of this (§3)
NOISE_SCALE = 1e-9      # new embedding rows: covariance NOISE_SCALE · Cov(old rows) (§3)

# First segment of an `OFFICIAL_KEYS` path -> attribute of `MemoryNets`.
_NET_NAMES = {"global_memory_net": "global_net", "temp_memory_net": "temp_net"}
# Plain HF backbone keys; the reference inserts `inner_layer.` after `layers.{i}.` (§12.1).
_PLAIN_BACKBONE_KEY = re.compile(
    r"^(model\.layers\.\d+)\.((?:self_attn|mlp|input_layernorm|post_attention_layernorm)\.)")
# Non-persistent buffers, never needed (the reference does not store them).
_BUFFERS = re.compile(r"^temp_beacon_id$|.*rotary_emb\.inv_freq$")


# ------------------------------------------------------------------------------ vocabulary

def resized_vocab_size(config: CometConfig, vocab_size: int) -> int:
  """Embedding rows after adding the CoMeT tokens (§3): `ceil(n/256)·256`, n = largest special id
  + 1 (the stock tokenizer length plus the added tokens), never below `vocab_size`.
  152320 for the defaults."""
  n_tokens = max(config.placeholder_id, config.temp_beacon_id, *config.global_beacon_ids) + 1
  return max(vocab_size, -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def resize_embedding(table, num_rows: int, seed: int = 0, *, block_rows: int = 8192):
  """Grows an embedding table like HF `resize_token_embeddings(mean_resizing=True)` (§3).

  Args:
    table: `[V, d]`. num_rows: rows of the result (≥ V). seed: seeds the noise.
    block_rows: rows per block of the covariance pass (bounds the temporary memory).

  Returns:
    `[num_rows, d]` in table's dtype: rows < V are `table` exactly; the others are
    `mean(table) + noise`, noise ~ N(0, 1e-9·Cov(table)) (biased covariance over all V rows).
  """
  table = np.asarray(table)
  old, dim = table.shape
  if num_rows < old:
    raise ValueError(f"resize_embedding: cannot shrink {old} rows to {num_rows}")
  out = np.empty((num_rows, dim), table.dtype)
  out[:old] = table
  if num_rows == old:
    return out
  blocks = [table[i:i + block_rows] for i in range(0, old, block_rows)]
  mean = sum(_widen(b).sum(0, dtype=np.float64) for b in blocks) / old
  cov = np.zeros((dim, dim))
  for b in blocks:
    centered = _widen(b)
    centered -= mean.astype(centered.dtype)
    cov += centered.T @ centered
  factor = _psd_factor(cov * (NOISE_SCALE / old))
  noise = np.random.default_rng(seed).standard_normal((num_rows - old, dim)) @ factor.T
  out[old:] = (mean + noise).astype(table.dtype)
  return out


def _widen(block):
  """A float copy of `block` for the covariance pass: fp64 stays, the rest becomes fp32 (bf16 by a
  bit shift, much faster than numpy's cast)."""
  if block.dtype == jnp.bfloat16:
    return (block.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return block.astype(np.promote_types(block.dtype, np.float32))


def _psd_factor(cov):
  """`A [d, d]` with `A Aᵀ = cov`: Cholesky, or `U·sqrt(max(w, 0))` from eigh when cov is
  singular (e.g. rows confined to a subspace)."""
  try:
    return scipy.linalg.cholesky(cov, lower=True)
  except np.linalg.LinAlgError:
    w, u = scipy.linalg.eigh(cov)
    return u * np.sqrt(np.clip(w, 0, None))


def _check_special_ids(config: CometConfig, vocab_size: int) -> None:
  for name in ("placeholder_id", "temp_beacon_id", "global_beacon_ids"):
    ids = np.atleast_1d(getattr(config, name))
    if ids.size and ids.max() >= vocab_size:
      raise ValueError(f"CoMeT special token ids must be < vocab_size ({vocab_size}); {name} "
                       f"has {int(ids.max())}")


# ---------------------------------------------------------------------------- memory nets

def _init_memory_nets(backbone_config: Qwen3Config, config: CometConfig, *, seed: int = 0,
                      param_dtype=jnp.float32) -> MemoryNets:
  """Stacked [L] memory nets with the modules' §4 init (N(0, 0.02) projections, norms 1), built
  like `CometForCausalLM.memory_nets`."""
  @nnx.split_rngs(splits=backbone_config.num_hidden_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return MemoryNets(backbone_config.hidden_size, config, param_dtype=param_dtype, rngs=rngs)

  return make(nnx.Rngs(seed))


def _memory_entries(backbone_config: Qwen3Config, config: CometConfig):
  """[(path in `memory_nets`, official key suffix, transposed, per-layer stored shape)] of the
  memory nets this config has, with shapes taken from the (abstract) modules."""
  abstract = nnx.eval_shape(lambda: _init_memory_nets(backbone_config, config))
  shapes = {tuple(path): var.get_value().shape[1:]
            for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  entries = []
  for nnx_key, (suffix, transpose) in OFFICIAL_KEYS.items():
    net, *rest = nnx_key.split(".")
    path = (_NET_NAMES[net], *rest)
    if path in shapes:
      entries.append((path, suffix, transpose, shapes.pop(path)[::-1 if transpose else 1]))
  if shapes:
    raise ValueError(f"memory-net parameters without an official key: {sorted(shapes)}")
  return entries


def _layer_key(i: int, suffix: str) -> str:
  return f"model.layers.{i}.{suffix}"


def _memory_to_params(tensors: dict[str, np.ndarray], backbone_config: Qwen3Config,
                      config: CometConfig) -> dict[str, Any]:
  """Pops the memory-net tensors out of `tensors` → nested `{global_net, temp_net}` [L, ...]."""
  entries, n_layers = _memory_entries(backbone_config, config), backbone_config.num_hidden_layers
  missing = sorted(_layer_key(i, e[1]) for e in entries for i in range(n_layers)
                   if _layer_key(i, e[1]) not in tensors)
  if missing:
    raise KeyError(f"checkpoint is missing keys: {missing}")
  params: dict[str, Any] = {}
  for path, suffix, transpose, shape in entries:
    layers = [tensors.pop(_layer_key(i, suffix)) for i in range(n_layers)]
    for i, a in enumerate(layers):
      if a.shape != shape:
        raise ValueError(f"{_layer_key(i, suffix)}: shape {a.shape} does not match the config's "
                         f"{shape}")
    _set(params, path, np.stack([a.T if transpose else a for a in layers]))
  return params


def _params_to_memory(params: dict[str, Any], backbone_config: Qwen3Config,
                      config: CometConfig) -> dict[str, np.ndarray]:
  """Nested memory-net params [L, ...] (numpy) → official tensors."""
  out = {}
  for path, suffix, transpose, _ in _memory_entries(backbone_config, config):
    stacked = _get(params, path)
    for i in range(backbone_config.num_hidden_layers):
      out[_layer_key(i, suffix)] = np.ascontiguousarray(stacked[i].T if transpose else stacked[i])
  return out


# ------------------------------------------------------------------------------ official

def official_shapes(backbone_config: Qwen3Config,
                    config: CometConfig) -> dict[str, tuple[int, ...]]:
  """§12.1 key → shape: backbone in the `inner_layer` spelling (tied lm_head omitted) and the
  memory nets this config has."""
  shapes = qwen3_shapes(backbone_config, INNER_LAYER_PREFIX)
  for _, suffix, _, shape in _memory_entries(backbone_config, config):
    shapes.update({_layer_key(i, suffix): shape
                   for i in range(backbone_config.num_hidden_layers)})
  return shapes


def official_config(backbone_config: Qwen3Config, config: CometConfig) -> dict[str, Any]:
  """The official `config.json` dict (§12.2): the Qwen3 fields (extra fields and key order kept),
  `architectures: ["MemQwen3ForCausalLM"]` and the CoMeT fields (G as `global_beacon_ids`)."""
  out = backbone_config.to_hf_dict()
  out["architectures"] = [OFFICIAL_ARCHITECTURE]
  out.update(config.to_hf_fields())
  return out


def _inner_spelling(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames plain backbone keys to the `inner_layer` spelling; drops non-persistent buffers."""
  out = {}
  for key, value in tensors.items():
    if _BUFFERS.match(key):
      continue
    new = _PLAIN_BACKBONE_KEY.sub(r"\1.inner_layer.\2", key)
    if new in out:
      raise ValueError(f"checkpoint holds {new} in both backbone spellings")
    out[new] = value
  return out


def _require_tied(backbone_config: Qwen3Config) -> None:
  if not backbone_config.tie_word_embeddings:
    raise ValueError("CoMeT needs tied embeddings (tie_word_embeddings: true)")


def _comet_config_from_file(raw: dict[str, Any], config: CometConfig | None) -> CometConfig:
  """CoMeT fields from `config.json`; the fields it does not store come from `config` (default
  `CometConfig()`), whose stored fields, when given, must agree with the file."""
  unstored = {f.name: getattr(config or CometConfig(), f.name)
              for f in dataclasses.fields(CometConfig) if f.name not in HF_FIELDS}
  from_file = CometConfig.from_hf_fields(raw, **unstored)
  if config is not None:
    differing = [name for name in HF_FIELDS if getattr(config, name) != getattr(from_file, name)]
    if differing:
      raise ValueError(f"config differs from config.json in {differing}; pass config=None to "
                       f"use the folder's values")
  return from_file


def _import_official(raw, tensors, config=None):
  backbone_config = Qwen3Config.from_hf_dict(raw)
  _require_tied(backbone_config)
  config = _comet_config_from_file(raw, config)
  _check_special_ids(config, backbone_config.vocab_size)
  tensors = _inner_spelling(tensors)
  memory = _memory_to_params(tensors, backbone_config, config)
  params = {"backbone": hf_to_params(tensors, backbone_config, INNER_LAYER_PREFIX)}
  if memory:
    params["memory_nets"] = memory
  return params, backbone_config, config


def import_official(path, config: CometConfig | None = None):
  """Reads a folder saved by the official CoMeT code (§12).

  Args:
    path: folder with `config.json` and `model.safetensors` (or shards plus an index).
    config: supplies the fields `config.json` does not store (`max_seq_length`, modes, eps...);
      its stored fields must agree with the file. Default: `CometConfig()`'s.

  Returns:
    (params: nested dict of numpy arrays in the file dtype, Qwen3Config, CometConfig).

  Raises:
    FileNotFoundError (missing folder/files), KeyError (missing keys), ValueError (corrupt files,
    unexpected keys, wrong shapes, lm_head ≠ embedding, missing `global_beacon_ids`, special ids
    ≥ vocab_size).
  """
  return _import_official(read_config(path), read_weights(path), config)


def export_official(params, backbone_config: Qwen3Config, config: CometConfig, path, *,
                    dtype: str | None = None, max_shard_size=None) -> None:
  """Writes an official folder (§12): `inner_layer` keys, memory-net keys, no lm_head.

  `dtype` None keeps each array's dtype (so `export_official(*import_official(p), q)` reproduces
  p's tensors and config.json exactly); "float32"/"bfloat16" casts and sets the config's dtype.
  """
  if dtype is not None and dtype not in SAVE_DTYPES:
    raise ValueError(f"save dtype must be one of {SAVE_DTYPES} or None, got {dtype!r}")
  _require_tied(backbone_config)
  _check_special_ids(config, backbone_config.vocab_size)
  cast = (lambda a: a) if dtype is None else (lambda a: a.astype(jnp.dtype(dtype)))
  params = jax.tree.map(lambda a: cast(np.asarray(jax.device_get(a))), params)
  tensors = params_to_hf(params["backbone"], backbone_config, INNER_LAYER_PREFIX)
  tensors.update(_params_to_memory(params.get("memory_nets", {}), backbone_config, config))
  for key, shape in official_shapes(backbone_config, config).items():
    if tensors[key].shape != shape:
      raise ValueError(f"{key}: shape {tensors[key].shape} does not match the config's {shape}")
  write_folder(path, tensors, official_config(backbone_config, config),
               max_shard_size=max_shard_size, dtype=dtype)


# ------------------------------------------------------------------------------ load / save

def _is_official(raw: dict[str, Any], tensors: dict[str, np.ndarray]) -> bool:
  return (OFFICIAL_ARCHITECTURE in (raw.get("architectures") or ()) or "global_beacon_ids" in raw
          or any(".inner_layer." in k or "_memory_net." in k for k in tensors))


def _with_fields(backbone_config: Qwen3Config, **changes) -> Qwen3Config:
  """`dataclasses.replace`, listing new fields in `hf_keys` so that config.json writes them."""
  keys = backbone_config.hf_keys
  keys += tuple(k for k in changes if keys and k not in keys)
  return dataclasses.replace(backbone_config, **changes, hf_keys=keys)


def _import_base(raw, tensors, config: CometConfig, seed: int):
  """Plain HF Qwen3 → CoMeT params: §4 memory init, §3 embedding resize, pad := eos."""
  backbone_config = Qwen3Config.from_hf_dict(raw)
  _require_tied(backbone_config)
  backbone = hf_to_params(tensors, backbone_config)
  vocab_size = resized_vocab_size(config, backbone_config.vocab_size)
  backbone["embedding"] = resize_embedding(backbone["embedding"], vocab_size, seed)
  eos = backbone_config.eos_token_id
  backbone_config = _with_fields(backbone_config, vocab_size=vocab_size,
                                 pad_token_id=eos[0] if isinstance(eos, tuple) else eos)
  _check_special_ids(config, vocab_size)
  params = {"backbone": backbone}
  memory = nnx.to_pure_dict(nnx.state(_init_memory_nets(backbone_config, config, seed=seed),
                                      nnx.Param))
  if memory:
    params["memory_nets"] = memory
  return params, backbone_config, config


def load_comet(path, config: CometConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, mesh=None, seed: int = 0,
               attention_impl: str | None = None) -> CometForCausalLM:
  """`CometForCausalLM` from (a) an official CoMeT folder or (b) a plain HF Qwen3 folder.

  (a) is recognised by its architecture, `global_beacon_ids` or memory/`inner_layer` keys; its
  CoMeT fields come from `config.json` (see `import_official` for `config`). (b) gets memory nets
  initialised per §4 and the embedding resized per §3 (both deterministic in `seed`),
  `vocab_size` updated and `pad_token_id := eos_token_id`; `config` defaults to `CometConfig()`
  (the paper recipe with stock-Qwen3 ids).

  Parameters are cast to `param_dtype`; with a mesh (given, or active via `jax.set_mesh`) the
  backbone is sharded by `dlax.convert.hf.placed_model`'s rules and the memory nets are replicated.
  `attention_impl` as in `CometForCausalLM`.
  """
  raw, tensors = read_config(path), read_weights(path)
  if _is_official(raw, tensors):
    params, backbone_config, config = _import_official(raw, tensors, config)
  else:
    params, backbone_config, config = _import_base(raw, tensors, config or CometConfig(), seed)
  abstract = nnx.eval_shape(lambda: CometForCausalLM(
      backbone_config, config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
      attention_impl=attention_impl))
  return placed_model(abstract, params, param_dtype=param_dtype, mesh=mesh,
                      replicated=("memory_nets",))


def _plain_qwen3_config(backbone_config: Qwen3Config) -> Qwen3Config:
  """The backbone config without the CoMeT fields and architecture."""
  extra = {k: v for k, v in backbone_config.extra.items()
           if k not in HF_FIELDS and k != "architectures"}
  keys = tuple(k for k in backbone_config.hf_keys if k not in HF_FIELDS)
  return dataclasses.replace(backbone_config, extra=extra, hf_keys=keys)


def save_comet(model: CometForCausalLM, path, *, format: str = "official",
               dtype: str = "float32", max_shard_size=None) -> None:
  """Writes `model` as an official CoMeT folder (§12, `format="official"`) or as a plain HF Qwen3
  folder of its backbone with the resized vocabulary (`"hf-backbone"`, loadable by transformers'
  `Qwen3ForCausalLM`), in `dtype` ("float32" or "bfloat16"), sharded with an index when
  `max_shard_size` (bytes or "200MB") is given."""
  if format not in FORMATS:
    raise ValueError(f"save format must be one of {FORMATS}, got {format!r}")
  if dtype not in SAVE_DTYPES:
    raise ValueError(f"save dtype must be one of {SAVE_DTYPES}, got {dtype!r}")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  backbone_config = model.backbone.hf_config
  if format == "official":
    export_official(params, backbone_config, model.config, path, dtype=dtype,
                    max_shard_size=max_shard_size)
    return
  backbone = jax.tree.map(lambda a: np.asarray(jax.device_get(a)).astype(jnp.dtype(dtype)),
                          params["backbone"])
  plain = _plain_qwen3_config(backbone_config)
  write_folder(path, params_to_hf(backbone, plain), plain.to_hf_dict(),
               max_shard_size=max_shard_size, dtype=dtype)

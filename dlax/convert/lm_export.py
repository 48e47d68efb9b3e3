"""`LanguageModel` <-> HF-style PyTorch folders (every family: Transformer, Mamba-2, Gated DeltaNet,
their Log-Linear and DLA versions).

`export_lm(model, folder)` writes

- `config.json`: `model_type: "dlax"`, `architectures`, `auto_map` (AutoConfig,
  AutoModelForCausalLM) and the `ModelConfig` fields (sub-configs as dicts; dlax's compute
  `dtype` as `compute_dtype`, since `dtype` is the weights' dtype in `transformers`);
- `model.safetensors` (or shards plus an index): torch-style names, one tensor per layer;
- `configuration_dlax.py` and `modeling_dlax.py` (`dlax/convert/torch_modeling`, pure PyTorch),

so that `transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
loads it. `import_lm(folder)` reads it back into a `LanguageModel`; an fp32 export round-trips
bit for bit.

Names: the dlax parameter path with the block index moved into `model.layers.{i}.` and
`kernel` renamed `weight` (transposed to PyTorch's `[out, in]`); conv weights `[W, C]` become
`[C, 1, W]` (depthwise `nn.Conv1d` layout); `embedding` → `model.embed_tokens.weight`,
`final_norm.weight` → `model.norm.weight`, `head.kernel` → `lm_head.weight` (absent when tied).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dlax.convert.hf import read_config, read_weights, write_folder
from dlax.layers.multistate import DLAConfig, LogLinearConfig
from dlax.models.config import AttentionConfig, GatedDeltaNetConfig, Mamba2Config, ModelConfig
from dlax.models.lm import LanguageModel

MODEL_TYPE = "dlax"
ARCHITECTURE = "DlaxForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_dlax.DlaxConfig",
            "AutoModelForCausalLM": "modeling_dlax.DlaxForCausalLM"}
MODELING_FILES = ("configuration_dlax.py", "modeling_dlax.py")
MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_modeling")
EXPORT_DTYPES = ("float32", "bfloat16")
LAYER_PREFIX = "model.layers.{i}."
_SUB_CONFIGS = {"mamba2": Mamba2Config, "gated_delta": GatedDeltaNetConfig,
                "attention": AttentionConfig, "dla": DLAConfig, "log_linear": LogLinearConfig}
_RENAMED = {"dtype": "compute_dtype"}              # ModelConfig field -> config.json key
_CONV_MODULES = ("conv", "q_conv", "k_conv", "v_conv")
_FP32_PARAMS = ("A_log", "D", "dt_bias", "lam_scale")  # kept in fp32 by dlax (state_dtype)


# ------------------------------------------------------------------------------------ config

def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The `config.json` dict of an export in `dtype`."""
  fields = {_RENAMED.get(f.name, f.name): getattr(config, f.name)
            for f in dataclasses.fields(config)}
  fields = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in fields.items()}
  return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "auto_map": dict(AUTO_MAP),
          "dtype": dtype, "tie_word_embeddings": config.tie_embeddings, **fields}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """`ModelConfig` of an export's `config.json` dict; ValueError when it is not a dlax export
  or its fields do not make a valid config."""
  if not isinstance(hf, dict) or hf.get("model_type") != MODEL_TYPE:
    kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
    raise ValueError(f"{source}: not a dlax export (model_type {kind!r}, expected "
                     f"{MODEL_TYPE!r}); dlax.convert.load_qwen3 reads Qwen3 folders")
  values = {}
  for f in dataclasses.fields(ModelConfig):
    key = _RENAMED.get(f.name, f.name)
    if key not in hf:
      if f.default is dataclasses.MISSING:
        raise ValueError(f"{source}: dlax export lacks the field {key!r}")
      continue
    value = hf[key]
    if f.name in _SUB_CONFIGS:
      kind = _SUB_CONFIGS[f.name]
      if not isinstance(value, dict):
        raise ValueError(f"{source}: {key} must be an object, got {value!r}")
      unknown = sorted(set(value) - {g.name for g in dataclasses.fields(kind)})
      if unknown:
        raise ValueError(f"{source}: {key} has unknown fields {unknown}")
      try:
        value = kind(**value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid {key}: {e}") from e
    values[f.name] = value
  try:
    return ModelConfig(**values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: invalid dlax config: {e}") from e


# ------------------------------------------------------------------------------------ names

def _flatten(tree: dict, prefix: tuple[str, ...] = ()):
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, dict):
      yield from _flatten(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _layer_name(path: tuple[str, ...]) -> str:
  """Torch name (after `model.layers.{i}.`) of a block parameter path."""
  return ".".join((*path[:-1], "weight" if path[-1] == "kernel" else path[-1]))


def _to_torch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
  """One layer's dlax array -> its PyTorch layout."""
  if path[-1] == "kernel":
    return a.T                                                   # [in, out] -> [out, in]
  if len(path) >= 2 and path[-2] in _CONV_MODULES and path[-1] == "weight":
    return a.T[:, None, :]                                       # [W, C] -> [C, 1, W]
  return a


def _from_torch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":
    return a.T
  if len(path) >= 2 and path[-2] in _CONV_MODULES and path[-1] == "weight":
    return a[:, 0, :].T
  return a


def _global_name(path: tuple[str, ...]) -> str:
  return {("embedding",): "model.embed_tokens.weight",
          ("final_norm", "weight"): "model.norm.weight",
          ("head", "kernel"): "lm_head.weight"}[path]


def params_to_torch(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """dlax's nested parameter dict (numpy; blocks stacked on [L]) -> PyTorch tensors by name."""
  out = {}
  for path, a in _flatten(params):
    if path[0] == "blocks":
      for i in range(a.shape[0]):
        out[LAYER_PREFIX.format(i=i) + _layer_name(path[1:])] = np.ascontiguousarray(
            _to_torch(path[1:], a[i]))
    else:
      out[_global_name(path)] = np.ascontiguousarray(_to_torch(path, a))
  return out


def torch_to_params(tensors: dict[str, np.ndarray], like: dict[str, Any],
                    source: str = "checkpoint") -> dict[str, Any]:
  """PyTorch tensors -> dlax's nested parameter dict shaped like `like` (arrays or shape
  structs). KeyError for missing tensors, ValueError for unexpected ones or shape mismatches."""
  n_layers = None
  expected: dict[str, tuple[tuple[str, ...], int | None]] = {}
  for path, leaf in _flatten(like):
    if path[0] == "blocks":
      n_layers = leaf.shape[0]
      for i in range(n_layers):
        expected[LAYER_PREFIX.format(i=i) + _layer_name(path[1:])] = (path, i)
    else:
      expected[_global_name(path)] = (path, None)
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise KeyError(f"{source} is missing tensors: {missing}")
  unexpected = sorted(set(tensors) - set(expected))
  if unexpected:
    raise ValueError(f"{source} has unexpected tensors: {unexpected}")
  layers: dict[tuple[str, ...], list] = {}
  params: dict[str, Any] = {}
  leaves = dict(_flatten(like))
  for name, (path, i) in expected.items():
    inner = path[1:] if i is not None else path
    a = _from_torch(inner, tensors[name])
    want = tuple(leaves[path].shape[1:] if i is not None else leaves[path].shape)
    if a.shape != want:
      raise ValueError(f"{source}: tensor {name} has shape {tensors[name].shape}, which does not "
                       f"match the config (dlax shape {want})")
    if i is None:
      _set(params, path, a)
    else:
      layers.setdefault(path, [None] * n_layers)[i] = a
  for path, stack in layers.items():
    _set(params, path, np.stack(stack))
  return params


def _set(tree: dict, path, value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


# ----------------------------------------------------------------------------- export / import

def export_lm(model: LanguageModel, folder, *, dtype: str = "float32", max_shard_size=None) -> None:
  """Writes `model` as an HF-style folder that `transformers` loads with `trust_remote_code`.

  Args:
    model: a `dlax.models.LanguageModel` (any family).
    folder: the output folder (created; earlier weight files in it are replaced).
    dtype: "float32" (exact) or "bfloat16" (A_log, D, dt_bias and λ scales stay fp32, as in
      dlax).
    max_shard_size: optional bytes or "200MB": shard the weights with an index.
  """
  if not isinstance(model, LanguageModel):
    raise TypeError(f"export_lm expects a dlax.models.LanguageModel, got {type(model).__name__}")
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
  tensors = params_to_torch(params)
  if dtype != "float32":
    tensors = {k: a if k.rsplit(".", 1)[-1] in _FP32_PARAMS else a.astype(jnp.dtype(dtype))
               for k, a in tensors.items()}
  write_folder(folder, tensors, config_to_hf(model.config, dtype), max_shard_size=max_shard_size)
  for name in MODELING_FILES:
    shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(folder, name))


def read_lm_config(folder) -> ModelConfig:
  """The `ModelConfig` of an exported folder (FileNotFoundError / ValueError when it is missing,
  corrupt or not a dlax export)."""
  return config_from_hf(read_config(folder), os.path.join(str(folder), "config.json"))


def import_lm(folder, *, config_overrides: dict[str, Any] | None = None) -> LanguageModel:
  """`LanguageModel` of an `export_lm` folder, each parameter in the dtype the config gives it
  (an fp32 export comes back bit for bit). `config_overrides` replaces `ModelConfig` fields that
  do not change the parameters (e.g. `impl`, `remat`, `dtype`)."""
  config = read_lm_config(folder)
  if config_overrides:
    config = dataclasses.replace(config, **config_overrides)
  tensors = read_weights(folder)
  abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  like = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  params = torch_to_params(tensors, like, source=str(folder))
  params = jax.tree.map(lambda a, s: jnp.asarray(np.asarray(a).astype(s.dtype)), params, like)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)

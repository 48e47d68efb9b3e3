"""Training configuration: frozen dataclasses (the single source of truth), YAML presets, overrides.

    config = load_config("tiny_demo", ["optimizer.lr=3e-4", "model.dla.capacity=16"])
    validate(config, jax.device_count())        # impossible combinations, before any compilation
    sizes = resolve_mesh(config.mesh, jax.device_count())   # {"data": 8, "fsdp": 1, ...}
    save_config(config, run_dir / "config.yaml")  # round-trips through load_config

`TrainConfig` fields (YAML keys; `a.b=c` overrides use the same dotted paths):

    task            "lm" (pre-training, section `model`) | "comet" (fine-tuning, section `comet`)
    seed            seed of the parameter init and of the training RNG key
    steps           optimizer steps to run
    model           dlax.models.config.ModelConfig with its sub-configs (mamba2, gated_delta,
                    attention, dla, log_linear); `dtype` / `param_dtype` are the dtype policy
    comet           CometModelConfig: init_from, backbone (Qwen3Config), memory (CometConfig),
                    dtype, param_dtype, attention_impl
    data            DataConfig: source, path, text_field, tokenizer, seq_len, global_batch_size,
                    seed, passkey (digits, depth), mqar (num_pairs, num_queries, key_len,
                    value_len)
    optimizer       OptimizerConfig: lr, b1, b2, eps, weight_decay, clip_norm, memory_lr_multiplier
    schedule        ScheduleConfig: kind, warmup_steps, total_steps, min_lr_ratio
    mesh            MeshConfig: data, fsdp, tensor, stage, pipeline, microbatches
    checkpoint      CheckpointConfig: dir, every_steps, keep, async_save
    logging         LoggingConfig: dir, every_steps, tensorboard, jsonl, progress
    eval            EvalConfig: every_steps, batches, passkey_lengths

Dtype policy: the model section owns it. Parameters are stored in `param_dtype` (fp32 master
weights by default; gradients and optimizer moments follow it) and the forward pass computes in
`dtype` (bf16 at paper scale): `LanguageModel(config.model, ...)` reads both from `ModelConfig`;
CoMeT is built as `CometForCausalLM(backbone, memory, dtype=comet.dtype,
param_dtype=comet.param_dtype, ...)` (or `.from_pretrained(comet.init_from, ...)`).

A preset YAML only sets fields; a top-level `base: <name or path>` key first loads another preset
(a name is looked up beside the file, then in `configs/`) and deep-merges this file over it.
Fields left out keep the dataclass defaults. All errors are `ConfigError` (a `ValueError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import yaml

from dlax.models.comet.config import CometConfig
from dlax.models.config import ModelConfig
from dlax.models.qwen3 import Qwen3Config

# The presets: `dlax_training/configs/` in a wheel, `configs/` beside `training/` in a checkout.
_HERE = pathlib.Path(__file__).resolve().parent
CONFIG_DIR = next((d for d in (_HERE / "configs", _HERE.parent / "configs") if d.is_dir()),
                  _HERE.parent / "configs")
BYTE_VOCAB = 261          # dlax_training.data.ByteTokenizer: 256 bytes + 5 special tokens
_NULLS = ("null", "none", "~")


class ConfigError(ValueError):
  """An unknown key, a badly typed value or an impossible combination of settings."""


def _check(config, condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(f"{type(config).__name__}: {message}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(config, *names: str, minimum: int = 1) -> None:
  for name in names:
    value = getattr(config, name)
    _check(config, _is_int(value) and value >= minimum,
           f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float_dtype(config, name: str) -> None:
  try:
    kind = jnp.dtype(getattr(config, name))
  except TypeError:
    kind = None
  _check(config, kind is not None and jnp.issubdtype(kind, jnp.floating),
         f"{name} must name a floating dtype, got {getattr(config, name)!r}")


# Sections.


@dataclasses.dataclass(frozen=True)
class CometModelConfig:
  """CoMeT fine-tuning: a Qwen3 `backbone` (architecture; random init when `init_from` is None)
  and/or `init_from` (a plain HF Qwen3 folder or an official CoMeT folder, whose config.json
  then defines the backbone), plus the memory plug-in `memory`."""
  init_from: str | None = None
  backbone: Qwen3Config | None = None
  memory: CometConfig = CometConfig()
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: Literal["xla", "cudnn"] | None = None

  def __post_init__(self):
    _check(self, self.init_from is not None or self.backbone is not None,
           "set comet.init_from (a Qwen3 or CoMeT folder) or comet.backbone (random init)")
    _check_float_dtype(self, "dtype")
    _check_float_dtype(self, "param_dtype")


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """Passkey retrieval: a random `digits`-digit key hidden in filler text at relative `depth`
  (None: uniform per example), asked for at the end."""
  digits: int = 5
  depth: float | None = None

  def __post_init__(self):
    _check_ints(self, "digits")
    _check(self, self.depth is None or 0 <= self.depth <= 1,
           f"depth must be null or in [0, 1], got {self.depth}")


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Multi-query associative recall: `num_pairs` `key:value` pairs (keys of `key_len` letters,
  values of `value_len` digits), then `num_queries` (None: all) keys whose values are the
  targets."""
  num_pairs: int = 16
  num_queries: int | None = None
  key_len: int = 3
  value_len: int = 2

  def __post_init__(self):
    _check_ints(self, "num_pairs", "key_len", "value_len")
    _check(self, self.num_queries is None or (_is_int(self.num_queries)
                                              and 1 <= self.num_queries <= self.num_pairs),
           f"num_queries must be null or an int in [1, num_pairs={self.num_pairs}], got "
           f"{self.num_queries!r}")
    _check(self, self.num_pairs <= 26 ** self.key_len,
           f"num_pairs ({self.num_pairs}) distinct keys need 26**key_len >= num_pairs")

  @property
  def byte_length(self) -> int:
    """Tokens of one example under the byte tokenizer: `key:value` plus a separator each."""
    queries = self.num_pairs if self.num_queries is None else self.num_queries
    return (self.num_pairs + queries) * (self.key_len + self.value_len + 2)


DataSource = Literal["embedded", "text", "jsonl", "chatml", "passkey", "mqar"]
FILE_SOURCES = ("text", "jsonl", "chatml")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data. `source`: the embedded corpus, plain text / JSONL (`text_field`) / ChatML
  files at `path` (a file, folder or glob; ChatML gets an assistant-only loss mask), or the
  synthetic passkey and MQAR tasks. `tokenizer`: "byte" or a `tokenizer.json` path. Documents are
  packed to `seq_len` tokens; `global_batch_size` sequences per step over all processes."""
  source: DataSource = "embedded"
  path: str | None = None
  text_field: str = "text"
  tokenizer: str = "byte"
  seq_len: int = 256
  global_batch_size: int = 8
  seed: int = 0
  passkey: PasskeyConfig = PasskeyConfig()
  mqar: MQARConfig = MQARConfig()

  def __post_init__(self):
    _check_ints(self, "seq_len", "global_batch_size")
    _check_ints(self, "seed", minimum=0)
    _check(self, self.source not in FILE_SOURCES or bool(self.path),
           f"source={self.source!r} needs a path (file, folder or glob)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with global-norm clipping (`clip_norm` None: off); CoMeT's memory nets train at
  `memory_lr_multiplier` × the learning rate."""
  lr: float = 3e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0
  memory_lr_multiplier: float = 5.0

  def __post_init__(self):
    _check(self, self.lr > 0, f"lr must be positive, got {self.lr}")
    _check(self, 0 <= self.b1 < 1 and 0 <= self.b2 < 1,
           f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
    _check(self, self.eps > 0, f"eps must be positive, got {self.eps}")
    _check(self, self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
    _check(self, self.clip_norm is None or self.clip_norm > 0,
           f"clip_norm must be positive or null, got {self.clip_norm}")
    _check(self, self.memory_lr_multiplier > 0,
           f"memory_lr_multiplier must be positive, got {self.memory_lr_multiplier}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio` × lr at
  `total_steps` (None: `TrainConfig.steps`), or constant."""
  kind: Literal["cosine", "constant"] = "cosine"
  warmup_steps: int = 0
  total_steps: int | None = None
  min_lr_ratio: float = 0.0

  def __post_init__(self):
    _check_ints(self, "warmup_steps", minimum=0)
    _check(self, self.total_steps is None or (_is_int(self.total_steps) and self.total_steps >= 1),
           f"total_steps must be null or an int >= 1, got {self.total_steps!r}")
    _check(self, 0 <= self.min_lr_ratio <= 1,
           f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


MESH_AXES = ("data", "fsdp", "tensor", "stage")
Pipeline = Literal["none", "gpipe", "comet"]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; one axis may be -1 (filled with the remaining devices).
  `pipeline` runs the `stage` axis: "gpipe" (layer stages, `microbatches` per step, task lm) or
  "comet" (CoMeT's chunk wavefront, spec comet.md §10)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  stage: int = 1
  pipeline: Pipeline = "none"
  microbatches: int = 1

  def __post_init__(self):
    for axis in MESH_AXES:
      size = getattr(self, axis)
      _check(self, _is_int(size) and (size >= 1 or size == -1),
             f"{axis} must be an int >= 1 or -1 (fill), got {size!r}")
    _check_ints(self, "microbatches")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints in `dir` (None: none) every `every_steps`, keeping the latest `keep`."""
  dir: str | None = None
  every_steps: int = 1000
  keep: int = 3
  async_save: bool = True

  def __post_init__(self):
    _check_ints(self, "every_steps", "keep")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """Metrics every `every_steps` to TensorBoard and/or `metrics.jsonl` in `dir` (process 0)."""
  dir: str | None = None
  every_steps: int = 10
  tensorboard: bool = True
  jsonl: bool = True
  progress: bool = True

  def __post_init__(self):
    _check_ints(self, "every_steps")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Perplexity over `batches` held-out batches and passkey retrieval at `passkey_lengths`
  tokens, every `every_steps` (0: only at the end of training)."""
  every_steps: int = 0
  batches: int = 8
  passkey_lengths: tuple[int, ...] = ()

  def __post_init__(self):
    _check_ints(self, "every_steps", "batches", minimum=0)
    _check(self, all(_is_int(n) and n >= 1 for n in self.passkey_lengths),
           f"passkey_lengths must be positive ints, got {self.passkey_lengths!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run; see the module docstring for the field tree."""
  task: Literal["lm", "comet"] = "lm"
  seed: int = 0
  steps: int = 1000
  model: ModelConfig | None = None
  comet: CometModelConfig | None = None
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  schedule: ScheduleConfig = ScheduleConfig()
  mesh: MeshConfig = MeshConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  logging: LoggingConfig = LoggingConfig()
  eval: EvalConfig = EvalConfig()

  def __post_init__(self):
    _check_ints(self, "steps")
    _check_ints(self, "seed", minimum=0)

  @property
  def schedule_steps(self) -> int:
    """The length of the learning-rate schedule."""
    return self.schedule.total_steps or self.steps


# Parsing: YAML values and override strings, converted with the dataclass field types.


def _config_fields(cls) -> list[dataclasses.Field]:
  """The settable fields; those left out of hashing are bookkeeping (Qwen3Config.extra, hf_keys)."""
  return [f for f in dataclasses.fields(cls) if f.init and f.hash is not False]


def _type_name(tp) -> str:
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_type_name(arg) for arg in args)
  if origin is Literal:
    return "one of " + ", ".join(map(repr, args))
  if origin is tuple:
    return f"a list of {_type_name(args[0])}"
  return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _parse_yaml(text: str, key: str):
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError as error:
    raise ConfigError(f"{key}: cannot parse {text!r}: {error}") from None


def _convert(tp, value, key: str, current=None):
  """`value` (from YAML, or an override string) as type `tp`; `current` is the value it replaces
  (the base of a nested dataclass)."""
  origin = typing.get_origin(tp)
  mismatch = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(tp)
    if type(None) in options and (value is None or (isinstance(value, str)
                                                    and value.strip().lower() in _NULLS)):
      return None
    for option in options:
      try:
        return _convert(option, value, key, current)
      except ConfigError as error:
        if dataclasses.is_dataclass(option) and isinstance(value, (Mapping, str)):
          raise error   # a section: its own error is the useful one
    raise mismatch
  if dataclasses.is_dataclass(tp):
    if isinstance(value, str):
      value = _parse_yaml(value, key)
    return _build(tp, value, key, current if isinstance(current, tp) else None)
  if origin is Literal:
    if value in typing.get_args(tp):
      return value
    raise mismatch
  if origin is tuple:
    if isinstance(value, str):
      text = value.strip()
      value = _parse_yaml(text, key) if text.startswith("[") else [
          item.strip() for item in text.split(",") if item.strip()]
    if not isinstance(value, (list, tuple)):
      raise mismatch
    return tuple(_convert(typing.get_args(tp)[0], item, f"{key}[{i}]")
                 for i, item in enumerate(value))
  return _convert_scalar(tp, value, mismatch)


def _convert_scalar(tp, value, mismatch: ConfigError):
  if tp is type(None):
    if value is None:
      return None
    raise mismatch
  if tp is str:
    if isinstance(value, str):
      return value
    raise mismatch
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
      return value.strip().lower() == "true"
    raise mismatch
  if isinstance(value, bool):
    raise mismatch
  try:
    if tp is int:
      return value if isinstance(value, int) else int(str(value).strip())
    if tp is float and isinstance(value, (int, float, str)):
      return float(value)
  except ValueError:
    pass
  raise mismatch


def _unknown_key(name: str, key: str, valid: Sequence[str]) -> ConfigError:
  where = key.rpartition(".")[0] or "the top level"
  close = difflib.get_close_matches(name, valid, n=1)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return ConfigError(f"unknown key {key!r}{hint}; valid keys of {where}: {', '.join(valid)}")


def _build(cls, values, key: str, base=None):
  """A `cls` from a mapping of its fields, over `base` (default: the dataclass defaults)."""
  join = lambda name: f"{key}.{name}" if key else name
  if not isinstance(values, Mapping):
    raise ConfigError(f"{key or 'config'}: expected a mapping of {cls.__name__} fields, got "
                      f"{values!r}")
  fields = {f.name: f for f in _config_fields(cls)}
  for name in values:
    if name not in fields:
      raise _unknown_key(str(name), join(str(name)), list(fields))
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    current = getattr(base, name) if base is not None else fields[name].default
    kwargs[name] = _convert(hints[name], value, join(name),
                            None if current is dataclasses.MISSING else current)
  if base is None:
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
      raise ConfigError(f"{key or 'config'}: missing required keys {', '.join(missing)}")
  try:
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
  except ValueError as error:
    raise ConfigError(f"{key}: {error}" if key else str(error)) from None


def _merge(base: dict, update: Mapping) -> dict:
  """`base` with `update` merged in, recursively for nested mappings (both left unchanged)."""
  merged = dict(base)
  for name, value in update.items():
    if isinstance(value, Mapping) and isinstance(merged.get(name), Mapping):
      value = _merge(merged[name], value)
    merged[name] = value
  return merged


def preset_path(preset: str | os.PathLike) -> pathlib.Path:
  """A preset name in `configs/` (e.g. "tiny_demo") or a YAML path."""
  path = pathlib.Path(preset)
  if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
    if not path.is_file():
      raise ConfigError(f"config file {str(path)!r} does not exist")
    return path
  path = CONFIG_DIR / f"{preset}.yaml"
  if not path.is_file():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))
    raise ConfigError(f"unknown preset {str(preset)!r}; presets in {CONFIG_DIR}: "
                      f"{', '.join(names)} (or give a .yaml path)")
  return path


def _read_preset(path: pathlib.Path, seen: tuple[pathlib.Path, ...] = ()) -> dict:
  """The raw mapping of a preset file, over its `base` preset if it names one."""
  path = path.resolve()
  if path in seen:
    raise ConfigError(f"{path}: `base` presets form a cycle")
  raw = _parse_yaml(path.read_text(), str(path))
  raw = {} if raw is None else raw
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{path}: a config file must hold a mapping of keys, got "
                      f"{type(raw).__name__}")
  raw = dict(raw)
  base = raw.pop("base", None)
  if base is None:
    return raw
  local = path.parent / f"{base}.yaml"
  base_path = local if local.is_file() else preset_path(base)
  return _merge(_read_preset(base_path, (*seen, path)), raw)


def _set_override(raw: dict, override: str) -> dict:
  """`raw` with `a.b.c=value` set (the value stays a string until typed by `_build`)."""
  key, sep, value = override.partition("=")
  parts = key.strip().split(".")
  if not sep or not all(parts):
    raise ConfigError(f"override {override!r} must look like key=value or section.key=value")
  update = value
  for part in reversed(parts):
    update = {part: update}
  node = raw
  for depth, part in enumerate(parts[:-1]):
    node = node.get(part) if isinstance(node, Mapping) else None
    if node is not None and not isinstance(node, Mapping):
      raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is a value, not a "
                        "section")
  return _merge(raw, update)


def config_from_dict(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
  """A `TrainConfig` from a (YAML-like) mapping and `a.b=c` overrides."""
  raw = dict(values)
  for override in overrides:
    raw = _set_override(raw, override)
  return _build(TrainConfig, raw, "")


def load_config(preset: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
  """The `TrainConfig` of a preset (a name in `configs/` or a YAML path) with `a.b=c` overrides.

  Raises `ConfigError` for unknown keys (listing the valid ones), values of the wrong type
  (naming the key, expected type and value) and settings the dataclasses reject. Device-dependent
  checks are in `validate`.
  """
  return config_from_dict(_read_preset(preset_path(preset)), overrides)


# Output.


def to_dict(config) -> dict[str, Any]:
  """A config dataclass as plain YAML/JSON data (tuples become lists)."""
  def plain(value):
    if dataclasses.is_dataclass(value):
      return {f.name: plain(getattr(value, f.name)) for f in _config_fields(type(value))}
    if isinstance(value, (tuple, list)):
      return [plain(item) for item in value]
    return value

  return plain(config)


class _Dumper(yaml.SafeDumper):
  """Block mappings, one-line lists."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def to_yaml(config: TrainConfig) -> str:
  """The full resolved config as YAML; `load_config` of it gives back `config`."""
  return yaml.dump(to_dict(config), Dumper=_Dumper, sort_keys=False, width=100)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
  pathlib.Path(path).write_text(to_yaml(config))


# Cross-field checks that need the device count.


def resolve_mesh(mesh: MeshConfig, device_count: int) -> dict[str, int]:
  """The mesh axis sizes with a -1 axis filled; their product must be `device_count`."""
  sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  fixed = math.prod(size for size in sizes.values() if size != -1)
  shown = "×".join(f"{axis}={size}" for axis, size in sizes.items())
  if len(fill) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1 (fill), got {', '.join(fill)}")
  if fill:
    if device_count % fixed:
      raise ConfigError(f"mesh: {shown}: the fixed axes (product {fixed}) do not divide the "
                        f"{device_count} devices, so mesh.{fill[0]}=-1 cannot fill them")
    sizes[fill[0]] = device_count // fixed
  elif fixed != device_count:
    raise ConfigError(f"mesh: {shown} has {fixed} devices but {device_count} are available "
                      "(set one axis to -1 to fill)")
  return sizes


def _vocab_size(config: TrainConfig) -> int | None:
  if config.task == "lm":
    return config.model.vocab_size
  return None if config.comet.backbone is None else config.comet.backbone.vocab_size


def _fail(message: str):
  raise ConfigError(message)


def _validate_sections(config: TrainConfig) -> None:
  task, mesh = config.task, config.mesh
  if task == "lm" and (config.model is None or config.comet is not None):
    _fail("task='lm' needs the model section and no comet section")
  if task == "comet" and (config.comet is None or config.model is not None):
    _fail("task='comet' needs the comet section and no model section")
  needs = {"gpipe": "lm", "comet": "comet"}.get(mesh.pipeline)
  if needs is not None and needs != task:
    _fail(f"mesh.pipeline={mesh.pipeline!r} is for task={needs!r}, got task={task!r}")
  if mesh.stage != 1 and mesh.pipeline == "none":
    _fail(f"mesh.stage={mesh.stage} needs mesh.pipeline 'gpipe' (lm) or 'comet' (comet)")
  if mesh.microbatches != 1 and mesh.pipeline != "gpipe":
    _fail(f"mesh.microbatches={mesh.microbatches} is only used by mesh.pipeline='gpipe', got "
          f"{mesh.pipeline!r}")
  if config.schedule.warmup_steps > config.schedule_steps:
    _fail(f"schedule.warmup_steps ({config.schedule.warmup_steps}) exceeds the schedule length "
          f"({config.schedule_steps} = schedule.total_steps or steps)")


def _validate_comet(config: TrainConfig, stages: int) -> None:
  memory, seq_len = config.comet.memory, config.data.seq_len
  if seq_len % memory.chunk_size:
    _fail(f"data.seq_len ({seq_len}) must be a multiple of comet.memory.chunk_size "
          f"({memory.chunk_size})")
  if seq_len > memory.max_seq_length:
    _fail(f"data.seq_len ({seq_len}) exceeds comet.memory.max_seq_length "
          f"({memory.max_seq_length})")
  chunks = seq_len // memory.chunk_size
  if config.mesh.pipeline == "comet" and chunks % stages:
    _fail(f"mesh.pipeline='comet' splits the {chunks} chunks of a sequence (data.seq_len / "
          f"comet.memory.chunk_size) over mesh.stage={stages} stages: not divisible")
  backbone = config.comet.backbone
  if config.comet.init_from is None and backbone is not None:
    top = max(memory.placeholder_id, memory.temp_beacon_id, *memory.global_beacon_ids)
    if top >= backbone.vocab_size:
      _fail(f"comet.memory special token ids go up to {top} but comet.backbone.vocab_size is "
            f"{backbone.vocab_size} (a random init does not resize the embedding)")


def _validate_data(config: TrainConfig) -> None:
  data, vocab = config.data, _vocab_size(config)
  if data.tokenizer != "byte":
    return
  if vocab is not None and vocab < BYTE_VOCAB:
    _fail(f"data.tokenizer='byte' needs a vocabulary of >= {BYTE_VOCAB} tokens, the model has "
          f"{vocab}")
  if data.source == "mqar" and data.mqar.byte_length > data.seq_len:
    _fail(f"an MQAR example of data.mqar ({data.mqar.byte_length} byte tokens) does not fit in "
          f"data.seq_len ({data.seq_len})")
  if data.source == "passkey":
    from dlax_training.data.synthetic import passkey_min_length   # data imports this module
    needed = passkey_min_length(data.passkey.digits)
    if needed > data.seq_len:
      _fail(f"a passkey document (at least {needed} byte tokens without filler) does not fit in "
            f"data.seq_len ({data.seq_len}); its question would be cut from its passkey")


def validate(config: TrainConfig, device_count: int) -> None:
  """Raises `ConfigError` for settings that cannot run on `device_count` devices or cannot work
  together (the per-section checks already ran when the dataclasses were built)."""
  _validate_sections(config)
  sizes = resolve_mesh(config.mesh, device_count)
  mesh, batch = config.mesh, config.data.global_batch_size
  replicas = sizes["data"] * sizes["fsdp"]
  if batch % replicas:
    _fail(f"data.global_batch_size ({batch}) is not divisible over the data-parallel axes "
          f"mesh.data × mesh.fsdp = {sizes['data']} × {sizes['fsdp']} = {replicas}")
  if mesh.pipeline == "gpipe":
    if (batch // replicas) % mesh.microbatches:
      _fail(f"the per-replica batch {batch // replicas} (data.global_batch_size / {replicas}) is "
            f"not divisible into mesh.microbatches={mesh.microbatches}")
    if config.model.n_layers % sizes["stage"]:
      _fail(f"mesh.pipeline='gpipe' needs model.n_layers ({config.model.n_layers}) divisible by "
            f"mesh.stage ({sizes['stage']})")
  if config.task == "comet":
    _validate_comet(config, sizes["stage"])
  _validate_data(config)

"""TrainConfig: presets, `a.b=c` overrides, error messages, validation and the YAML round trip."""

from __future__ import annotations

import json

import pytest

from dlax.models import paper_config, tiny_config
from dlax_training.config import (CONFIG_DIR, ConfigError, TrainConfig, config_from_dict,
                                  load_config, resolve_mesh, save_config, to_dict, to_yaml,
                                  validate)

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))
PAPER_MODELS = {"mamba2": ("mamba2", "none", 21), "gdn": ("gated_delta", "none", 21),
                "dla_mamba2": ("mamba2", "dla", 21), "dla_gdn": ("gated_delta", "dla", 21),
                "log_linear_mamba2": ("mamba2", "log_linear", 21),
                "log_linear_gdn": ("gated_delta", "log_linear", 21),
                "transformer": ("attention", "none", 24)}
COMET = ("comet_qwen3_0.6b", "comet_qwen3_4b")


def _error(preset: str, overrides=(), devices: int | None = None) -> str:
  """The ConfigError message of loading (and, with `devices`, validating) a config."""
  with pytest.raises(ConfigError) as info:
    config = load_config(preset, overrides)
    if devices is not None:
      validate(config, devices)
  return str(info.value)


# Presets.


def test_all_presets_exist():
  assert set(PRESETS) == {"tiny_demo", "tiny_comet", *PAPER_MODELS, *COMET}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_validates_and_round_trips(preset, tmp_path):
  config = load_config(preset)
  validate(config, 1 if preset.startswith("tiny_") else 8)
  save_config(config, tmp_path / "config.yaml")
  assert load_config(tmp_path / "config.yaml") == config
  json.dumps(to_dict(config))


def test_tiny_demo_is_the_tiny_dla_mamba2():
  config = load_config("tiny_demo")
  assert config.model == tiny_config("mamba2", "dla", vocab_size=261)
  assert config.data.source == "embedded" and config.data.tokenizer == "byte"
  assert config.checkpoint.dir is not None and config.logging.dir is not None


@pytest.mark.parametrize("preset", sorted(PAPER_MODELS))
def test_paper_presets_match_paper_config(preset):
  mixer, multistate, n_layers = PAPER_MODELS[preset]
  config = load_config(preset)
  assert config.model == paper_config(mixer, multistate, n_layers=n_layers, dtype="bfloat16")
  assert config.data.seq_len * config.data.global_batch_size == 2 ** 19
  assert config.steps == 95368


@pytest.mark.parametrize("preset", COMET)
def test_comet_presets_follow_the_reference_recipe(preset):
  c = load_config(preset)
  memory, opt, schedule = c.comet.memory, c.optimizer, c.schedule
  assert (memory.chunk_size, memory.global_mem_size, memory.temp_beacon_stride,
          memory.temp_mem_budget, memory.max_seq_length) == (2048, 512, 8, 2048, 32768)
  assert (opt.lr, opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.clip_norm,
          opt.memory_lr_multiplier) == (5e-5, 0.9, 0.999, 1e-8, 0.0, 1.5, 5.0)
  assert (schedule.kind, schedule.warmup_steps, schedule.min_lr_ratio) == ("cosine", 10, 0.0)
  assert (c.data.global_batch_size, c.data.seq_len, c.data.source, c.seed) == (8, 32768,
                                                                                "chatml", 42)
  assert (c.comet.dtype, c.comet.param_dtype) == ("bfloat16", "float32")
  assert c.comet.init_from and c.comet.backbone.tie_word_embeddings


def test_unknown_preset_lists_the_presets():
  message = _error("no_such_preset")
  assert "unknown preset 'no_such_preset'" in message and "tiny_demo" in message


# Overrides.


def test_overrides_of_every_type(rng):
  capacity, lr = int(rng.integers(2, 64)), float(rng.uniform(1e-5, 1e-3))
  lengths = sorted(int(n) for n in rng.integers(1, 10_000, 3))
  config = load_config("tiny_demo", [
      f"model.dla.capacity={capacity}", f"optimizer.lr={lr:.6e}", "checkpoint.async_save=false",
      "logging.tensorboard=True", "data.path=some/file.txt", "optimizer.clip_norm=null",
      f"eval.passkey_lengths={','.join(map(str, lengths))}", "mesh.pipeline=gpipe",
      "model.attention.implementation=xla", "model.dla.num_lambda=2", "schedule.total_steps=None"])
  assert config.model.dla.capacity == capacity and config.model.dla.num_lambda == 2
  assert config.optimizer.lr == pytest.approx(lr, rel=1e-6)
  assert config.checkpoint.async_save is False and config.logging.tensorboard is True
  assert config.data.path == "some/file.txt" and config.optimizer.clip_norm is None
  assert config.eval.passkey_lengths == tuple(lengths) and config.mesh.pipeline == "gpipe"
  assert config.model.attention.implementation == "xla" and config.schedule.total_steps is None
  # the rest of the preset is untouched
  assert config.model.dla.tau == 0.6 and config.model.chunk_size == 16


@pytest.mark.parametrize("text, value", [("3e-4", 3e-4), ("1E-3", 1e-3), ("2", 2.0), (".5", 0.5)])
def test_float_overrides(text, value):
  assert load_config("tiny_demo", [f"optimizer.lr={text}"]).optimizer.lr == value


@pytest.mark.parametrize("text, value", [("[64, 128]", (64, 128)), ("64,128", (64, 128)),
                                         ("512", (512,)), ("[]", ()), ("", ())])
def test_tuple_overrides(text, value):
  assert load_config("tiny_demo", [f"eval.passkey_lengths={text}"]).eval.passkey_lengths == value


def test_union_and_section_overrides():
  config = load_config("comet_qwen3_0.6b", ["comet.backbone.eos_token_id=1,2",
                                            "comet.memory.fifo_mode=official"])
  assert config.comet.backbone.eos_token_id == (1, 2)
  assert config.comet.memory.fifo_mode == "official"
  config = load_config("tiny_demo", ["model.dla={capacity: 4, tau: 0.5}"])
  assert (config.model.dla.capacity, config.model.dla.tau) == (4, 0.5)


def test_overrides_apply_in_order():
  config = load_config("tiny_demo", ["steps=5", "steps=7"])
  assert config.steps == 7


@pytest.mark.parametrize("override, expected", [
    ("model.dla.capacity=abc", "model.dla.capacity: expected int, got 'abc'"),
    ("model.dla.capacity=2.5", "model.dla.capacity: expected int, got '2.5'"),
    ("optimizer.lr=fast", "optimizer.lr: expected float, got 'fast'"),
    ("checkpoint.async_save=maybe", "checkpoint.async_save: expected bool, got 'maybe'"),
    ("mesh.pipeline=pipedream",
     "mesh.pipeline: expected one of 'none', 'gpipe', 'comet', got 'pipedream'"),
    ("eval.passkey_lengths=1,x", "eval.passkey_lengths[1]: expected int, got 'x'"),
    ("steps=null", "steps: expected int, got 'null'"),
    ("model.dla=7", "model.dla: expected a mapping of DLAConfig fields, got 7"),
])
def test_type_errors_name_key_type_and_value(override, expected):
  assert expected in _error("tiny_demo", [override])


@pytest.mark.parametrize("override, expected", [
    ("optimizer.weight_decai=1",
     "unknown key 'optimizer.weight_decai' (did you mean 'weight_decay'?)"),
    ("optimizer.learning_rate=1", "unknown key 'optimizer.learning_rate'; valid keys of optimizer"),
    ("model.dla.capcity=4", "unknown key 'model.dla.capcity' (did you mean 'capacity'?)"),
    ("trainer.steps=4", "unknown key 'trainer'"),
])
def test_unknown_override_keys(override, expected):
  message = _error("tiny_demo", [override])
  assert expected in message and "valid keys of" in message


def test_unknown_key_lists_the_valid_keys():
  message = _error("tiny_demo", ["optimizer.momentum=0.9"])
  assert ("valid keys of optimizer: lr, b1, b2, eps, weight_decay, clip_norm, "
          "memory_lr_multiplier") in message


@pytest.mark.parametrize("override, expected", [
    ("lr", "override 'lr' must look like key=value or section.key=value"),
    ("=3", "override '=3' must look like"),
    ("optimizer.=3", "override 'optimizer.=3' must look like"),
    ("optimizer.lr.x=3", "override 'optimizer.lr.x=3': optimizer.lr is a value, not a section"),
])
def test_malformed_overrides(override, expected):
  assert expected in _error("tiny_demo", [override])


# YAML files.


def test_yaml_unknown_and_badly_typed_keys(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("base: tiny_demo\nmodel:\n  dla:\n    capcity: 4\n")
  assert "unknown key 'model.dla.capcity'" in _error(path)
  path.write_text("base: tiny_demo\ntrainer: {steps: 3}\n")
  assert "unknown key 'trainer'; valid keys of the top level: task, seed, steps" in _error(path)
  path.write_text("base: tiny_demo\nsteps: 1.5\n")
  assert "steps: expected int, got 1.5" in _error(path)
  path.write_text("- a list\n")
  assert "must hold a mapping" in _error(path)


def test_yaml_base_is_merged_and_cycles_fail(tmp_path, rng):
  lr = float(rng.uniform(1e-4, 1e-2))
  (tmp_path / "child.yaml").write_text(f"base: tiny_demo\noptimizer: {{lr: {lr!r}}}\n")
  config = load_config(tmp_path / "child.yaml")
  assert config.optimizer.lr == lr and config.optimizer.clip_norm == 1.0
  assert config.model == load_config("tiny_demo").model
  (tmp_path / "a.yaml").write_text("base: b\n")
  (tmp_path / "b.yaml").write_text("base: a\n")
  assert "cycle" in _error(tmp_path / "a.yaml")


def test_missing_file_and_missing_required_model_keys(tmp_path):
  assert "does not exist" in _error(tmp_path / "nope.yaml")
  with pytest.raises(ConfigError, match="model: missing required keys vocab_size, n_layers, "
                                        "mixer, d_ff"):
    config_from_dict({"model": {"d_model": 8}})


def test_round_trip_with_random_overrides(rng, tmp_path):
  overrides = [f"seed={int(rng.integers(0, 1000))}", f"optimizer.b2={rng.uniform(0.9, 0.99)!r}",
               f"data.seq_len={int(rng.integers(16, 512))}", "model.multistate=log_linear",
               f"eval.passkey_lengths={int(rng.integers(1, 99))},{int(rng.integers(100, 999))}",
               "optimizer.clip_norm=null", "data.source=text", "data.path=a b/c:d.txt",
               "data.tokenizer=true"]
  config = load_config("tiny_demo", overrides)
  assert config.data.tokenizer == "true"
  save_config(config, tmp_path / "resolved.yaml")
  assert load_config(tmp_path / "resolved.yaml") == config
  assert config_from_dict(json.loads(json.dumps(to_dict(config)))) == config
  assert to_yaml(load_config(tmp_path / "resolved.yaml")) == to_yaml(config)


# Errors of the dataclasses themselves, named by their section.


@pytest.mark.parametrize("preset, override, expected", [
    ("tiny_demo", "model.dla.capacity=1", "model.dla: DLAConfig: capacity must be an int >= 2"),
    ("log_linear_mamba2", "model.chunk_size=48", "needs a power-of-two chunk_size"),
    ("tiny_demo", "data.source=text", "data: DataConfig: source='text' needs a path"),
    ("tiny_demo", "data.seq_len=0", "data: DataConfig: seq_len must be an int >= 1, got 0"),
    ("tiny_demo", "mesh.data=0", "mesh: MeshConfig: data must be an int >= 1 or -1 (fill)"),
    ("tiny_demo", "optimizer.clip_norm=-1", "clip_norm must be positive or null"),
    ("tiny_demo", "schedule.min_lr_ratio=2", "min_lr_ratio must be in [0, 1]"),
    ("tiny_demo", "data.mqar.num_queries=17",
     "data.mqar: MQARConfig: num_queries must be null or an int in [1, num_pairs=16], got 17"),
    ("tiny_demo", ["data.mqar.key_len=1", "data.mqar.num_pairs=30"],
     "num_pairs (30) distinct keys need 26**key_len >= num_pairs"),
    ("tiny_demo", "data.passkey.depth=1.5", "depth must be null or in [0, 1], got 1.5"),
    ("tiny_demo", "model.dtype=int32", "dtype must name a floating dtype"),
    ("comet_qwen3_0.6b", "comet.memory.max_seq_length=5000",
     "comet.memory: CometConfig: max_seq_length (5000) must be divisible by chunk_size (2048)"),
    ("comet_qwen3_0.6b", "comet.init_from=null",
     None),   # the backbone alone is a valid random-init config (checked by validate)
])
def test_section_errors(preset, override, expected):
  overrides = override if isinstance(override, list) else [override]
  if expected is None:
    load_config(preset, overrides)
  else:
    assert expected in _error(preset, overrides)


def test_comet_section_needs_weights_or_backbone():
  message = _error("comet_qwen3_0.6b", ["comet.init_from=null", "comet.backbone=null"])
  assert "comet: CometModelConfig: set comet.init_from" in message


# Cross-field checks (validate).


@pytest.mark.parametrize("preset, overrides, devices, expected", [
    ("tiny_demo", ["mesh.data=2"], 8,
     "mesh: data=2×fsdp=1×tensor=1×stage=1 has 2 devices but 8 are available"),
    ("tiny_demo", ["mesh.fsdp=3"], 8,
     "the fixed axes (product 3) do not divide the 8 devices, so mesh.data=-1 cannot fill them"),
    ("tiny_demo", ["mesh.fsdp=-1"], 8, "at most one axis may be -1 (fill), got data, fsdp"),
    ("tiny_demo", ["data.global_batch_size=6"], 4,
     "data.global_batch_size (6) is not divisible over the data-parallel axes mesh.data × "
     "mesh.fsdp = 4 × 1 = 4"),
    ("tiny_demo", ["data.global_batch_size=12", "mesh.fsdp=4"], 8,
     "mesh.data × mesh.fsdp = 2 × 4 = 8"),
    ("tiny_demo", ["mesh.pipeline=gpipe", "mesh.stage=2", "mesh.microbatches=3"], 4,
     "the per-replica batch 4 (data.global_batch_size / 2) is not divisible into "
     "mesh.microbatches=3"),
    ("tiny_demo", ["mesh.pipeline=gpipe", "mesh.stage=4"], 4,
     "mesh.pipeline='gpipe' needs model.n_layers (2) divisible by mesh.stage (4)"),
    ("tiny_demo", ["mesh.pipeline=comet", "mesh.stage=2"], 2,
     "mesh.pipeline='comet' is for task='comet', got task='lm'"),
    ("comet_qwen3_0.6b", ["mesh.pipeline=gpipe", "mesh.stage=2"], 2,
     "mesh.pipeline='gpipe' is for task='lm', got task='comet'"),
    ("tiny_demo", ["mesh.stage=2"], 2, "mesh.stage=2 needs mesh.pipeline 'gpipe' (lm) or 'comet'"),
    ("tiny_demo", ["mesh.microbatches=2"], 1,
     "mesh.microbatches=2 is only used by mesh.pipeline='gpipe', got 'none'"),
    ("comet_qwen3_0.6b", ["data.seq_len=3000"], 8,
     "data.seq_len (3000) must be a multiple of comet.memory.chunk_size (2048)"),
    ("comet_qwen3_0.6b", ["data.seq_len=65536"], 8,
     "data.seq_len (65536) exceeds comet.memory.max_seq_length (32768)"),
    ("comet_qwen3_0.6b", ["mesh.pipeline=comet", "mesh.stage=3"], 6,
     "mesh.pipeline='comet' splits the 16 chunks of a sequence (data.seq_len / "
     "comet.memory.chunk_size) over mesh.stage=3 stages: not divisible"),
    ("comet_qwen3_0.6b", ["comet.init_from=null"], 8,
     "comet.memory special token ids go up to 152182 but comet.backbone.vocab_size is 151936"),
    ("tiny_demo", ["task=comet"], 1, "task='comet' needs the comet section and no model section"),
    ("comet_qwen3_0.6b", ["task=lm"], 8, "task='lm' needs the model section and no comet section"),
    ("tiny_demo", ["model.vocab_size=100"], 1,
     "data.tokenizer='byte' needs a vocabulary of >= 261 tokens, the model has 100"),
    ("tiny_demo", ["data.source=mqar"], 1,
     "an MQAR example of data.mqar (224 byte tokens) does not fit in data.seq_len (128)"),
    ("tiny_demo", ["data.source=passkey"], 1,
     "a passkey document (at least 249 byte tokens without filler) does not fit in "
     "data.seq_len (128); its question would be cut from its passkey"),
    ("tiny_demo", ["schedule.warmup_steps=400"], 1,
     "schedule.warmup_steps (400) exceeds the schedule length (300"),
])
def test_validate_errors(preset, overrides, devices, expected):
  assert expected in _error(preset, overrides, devices)


def test_valid_combinations():
  validate(load_config("tiny_demo", ["data.source=mqar", "data.mqar.num_pairs=4"]), 1)
  validate(load_config("tiny_demo", ["mesh.tensor=3", "mesh.data=1"]), 3)   # replicates
  validate(load_config("tiny_demo", ["mesh.pipeline=gpipe", "mesh.stage=2",
                                     "mesh.microbatches=4"]), 4)
  validate(load_config("dla_gdn", ["mesh.pipeline=gpipe", "mesh.stage=7",
                                   "data.global_batch_size=64"]), 56)
  validate(load_config("tiny_demo", ["mesh.fsdp=2", "mesh.tensor=2"]), 8)
  validate(load_config("comet_qwen3_4b", ["mesh.pipeline=comet", "mesh.stage=4"]), 32)
  validate(load_config("comet_qwen3_0.6b", ["data.seq_len=8192"]), 8)


def test_resolve_mesh_fills_one_axis(rng):
  fsdp, tensor, data = (int(n) for n in rng.integers(1, 5, 3))
  mesh = load_config("tiny_demo", [f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]).mesh
  assert resolve_mesh(mesh, data * fsdp * tensor) == {"data": data, "fsdp": fsdp,
                                                      "tensor": tensor, "stage": 1}


def test_config_error_is_a_value_error():
  assert issubclass(ConfigError, ValueError)
  with pytest.raises(ValueError):
    validate(TrainConfig(), 1)   # task "lm" without a model section

"""CoMeT configuration (spec §5, §12.2): the memory plug-in's fields only, no backbone fields.

The Qwen3 backbone has its own config; a CoMeT model pairs the two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import jax.numpy as jnp

GENERATION_LAYOUTS = ("clean", "official")
FIFO_MODES = ("clean", "official")
LAYOUTS = ("uniform", "exact")
GATES = ("slot", "elementwise")

# The `config.json` fields of the official config class (§12.2), in its spelling.
HF_FIELDS = ("chunk_size", "placeholder_id", "temp_beacon_id", "temp_beacon_stride",
             "temp_mem_budget", "global_beacon_ids")
# The official config class's defaults, used for fields a `config.json` leaves out. They differ from
# the paper recipe (the `CometConfig` defaults); `global_beacon_ids` has no usable default.
OFFICIAL_CLASS_DEFAULTS: Mapping[str, Any] = {
    "chunk_size": 512, "placeholder_id": 128000, "temp_beacon_id": 128001,
    "temp_beacon_stride": 8, "temp_mem_budget": 128, "global_beacon_ids": None,
}

# Stock Qwen3 tokenizer size: the first added id (§3).
QWEN3_FIRST_SPECIAL_ID = 151669


def special_token_ids(first_id: int, global_mem_size: int) -> tuple[int, tuple[int, ...], int]:
  """The §3 ids appended from `first_id`: (placeholder, G global beacons, temp beacon)."""
  globals_ = tuple(range(first_id + 1, first_id + 1 + global_mem_size))
  return first_id, globals_, first_id + 1 + global_mem_size


_PLACEHOLDER, _GLOBAL_BEACONS, _TEMP_BEACON = special_token_ids(QWEN3_FIRST_SPECIAL_ID, 512)


def _fail(message: str):
  raise ValueError(f"CometConfig: {message}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class CometConfig:
  """CoMeT memory settings; defaults are the paper recipe (C=2048, G=512, s=8, Bt=2048, 32k).

  G (`global_mem_size`) is `len(global_beacon_ids)`, as in the official config; G = 0 disables the
  global path and `temp_beacon_stride = -1` the temporary path. `state_dtype=None` means the
  compute dtype. The `"official"` modes reproduce the reference quirks (§6.5, §8).
  """
  chunk_size: int = 2048
  temp_beacon_stride: int = 8
  temp_mem_budget: int = 2048
  rla_rank: int = 8
  placeholder_id: int = _PLACEHOLDER
  temp_beacon_id: int = _TEMP_BEACON
  global_beacon_ids: tuple[int, ...] = _GLOBAL_BEACONS
  max_seq_length: int = 32768
  eps_global_norm: float = 1.1920929e-7
  eps_temp_norm: float = 1e-12
  state_dtype: str | None = None
  generation_layout: Literal["clean", "official"] = "clean"
  fifo_mode: Literal["clean", "official"] = "clean"
  layout: Literal["uniform", "exact"] = "uniform"
  gate: Literal["slot", "elementwise"] = "slot"
  freeze_backbone: bool = False

  def __post_init__(self):
    if self.global_beacon_ids is None or isinstance(self.global_beacon_ids, (str, bytes)):
      _fail(f"global_beacon_ids must be a sequence of ints, got {self.global_beacon_ids!r}")
    object.__setattr__(self, "global_beacon_ids", tuple(self.global_beacon_ids))
    self._check_sizes()
    self._check_ids()
    self._check_options()

  def _check_sizes(self) -> None:
    for name in ("chunk_size", "temp_mem_budget", "rla_rank", "max_seq_length"):
      value = getattr(self, name)
      if not _is_int(value) or value <= 0:
        _fail(f"{name} must be a positive int, got {value!r}")
    stride = self.temp_beacon_stride
    if not _is_int(stride) or not (stride == -1 or stride >= 1):
      _fail(f"temp_beacon_stride must be -1 (disabled) or >= 1, got {stride!r}")
    if self.max_seq_length % self.chunk_size:
      _fail(f"max_seq_length ({self.max_seq_length}) must be divisible by chunk_size "
            f"({self.chunk_size})")
    for name in ("eps_global_norm", "eps_temp_norm"):
      if not getattr(self, name) > 0:
        _fail(f"{name} must be positive, got {getattr(self, name)!r}")

  def _check_ids(self) -> None:
    ids = (self.placeholder_id, self.temp_beacon_id, *self.global_beacon_ids)
    if not all(_is_int(i) and i >= 0 for i in ids):
      _fail(f"token ids must be non-negative ints, got placeholder_id={self.placeholder_id!r}, "
            f"temp_beacon_id={self.temp_beacon_id!r}, global_beacon_ids={self.global_beacon_ids!r}")
    if len(set(ids)) != len(ids):
      _fail("placeholder_id, temp_beacon_id and global_beacon_ids must be pairwise distinct")

  def _check_options(self) -> None:
    for name, allowed in (("generation_layout", GENERATION_LAYOUTS), ("fifo_mode", FIFO_MODES),
                          ("layout", LAYOUTS), ("gate", GATES)):
      if getattr(self, name) not in allowed:
        _fail(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if not isinstance(self.freeze_backbone, bool):
      _fail(f"freeze_backbone must be a bool, got {self.freeze_backbone!r}")
    if self.state_dtype is not None:
      try:
        kind = jnp.dtype(self.state_dtype)
      except TypeError:
        kind = None
      if kind is None or not jnp.issubdtype(kind, jnp.floating):
        _fail(f"state_dtype must be None or name a floating dtype, got {self.state_dtype!r}")

  # Derived sizes (§1).

  @property
  def global_mem_size(self) -> int:
    """G: global slots = readout tokens = len(global_beacon_ids)."""
    return len(self.global_beacon_ids)

  @property
  def use_global(self) -> bool:
    return self.global_mem_size > 0

  @property
  def use_temp(self) -> bool:
    return self.temp_beacon_stride != -1

  @property
  def num_comp(self) -> int:
    """nb = ceil(C/s): compression positions of a full chunk (0 when the temp path is off)."""
    return math.ceil(self.chunk_size / self.temp_beacon_stride) if self.use_temp else 0

  @property
  def temp_capacity(self) -> int:
    """FIFO slots actually used: Bt, or 0 when the temp path is off."""
    return self.temp_mem_budget if self.use_temp else 0

  @property
  def max_chunk_len(self) -> int:
    """Lmax = 2G + Bt + C + nb: the longest possible chunk (5376 at the defaults)."""
    return 2 * self.global_mem_size + self.temp_capacity + self.chunk_size + self.num_comp

  @property
  def num_chunks(self) -> int:
    """Chunks per training sequence: max_seq_length / C."""
    return self.max_seq_length // self.chunk_size

  # config.json (§12.2).

  def to_hf_fields(self) -> dict[str, Any]:
    """The CoMeT fields of the official `config.json`; G is written as the id list."""
    fields = {name: getattr(self, name) for name in HF_FIELDS}
    fields["global_beacon_ids"] = list(self.global_beacon_ids)
    return fields

  @classmethod
  def from_hf_fields(cls, fields: Mapping[str, Any], **overrides) -> CometConfig:
    """Reads the CoMeT fields of a `config.json` (other keys are ignored).

    Missing fields take the official class defaults (`OFFICIAL_CLASS_DEFAULTS`), not the recipe;
    `global_beacon_ids` must be present (G = its length). `overrides` set the fields that
    `config.json` does not store (e.g. `max_seq_length`, `fifo_mode`).
    """
    values = {name: fields.get(name, OFFICIAL_CLASS_DEFAULTS[name]) for name in HF_FIELDS}
    if values["global_beacon_ids"] is None:
      _fail("config.json must set global_beacon_ids (G = len(global_beacon_ids))")
    bad = set(overrides) & set(HF_FIELDS)
    if bad:
      _fail(f"overrides may only set fields absent from config.json, got {sorted(bad)}")
    return cls(**values, **overrides)


def tiny_comet_config(first_special_id: int = 240, global_mem_size: int = 4,
                      **overrides) -> CometConfig:
  """The §15 test setting: C=16, G=4, s=4, Bt=8, 4 chunks; ids appended from `first_special_id`."""
  placeholder, global_ids, temp = special_token_ids(first_special_id, global_mem_size)
  base = CometConfig(chunk_size=16, temp_beacon_stride=4, temp_mem_budget=8,
                     placeholder_id=placeholder, temp_beacon_id=temp, global_beacon_ids=global_ids,
                     max_seq_length=64)
  return dataclasses.replace(base, **overrides)

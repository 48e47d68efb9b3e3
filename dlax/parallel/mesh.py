"""Device mesh, the logical-axis rules table, and parameter / optimizer-state / batch shardings.

Every parameter of a dlax model (`LanguageModel`, `Qwen3ForCausalLM`, `CometForCausalLM`) gets
logical axis names from its path (`PARAM_AXES`; the stacked layer axis of `blocks` and
`memory_nets` is "layers"). `LOGICAL_AXIS_RULES` maps logical names to the mesh axes
`('data', 'fsdp', 'tensor', 'stage')`; a dim is sharded only when the mesh has the axis and its
size divides the dim (an axis of size 1 may appear in a spec; it splits nothing). Optimizer states
(optax) mirror the parameters: a leaf whose path ends with a parameter's path and has its rank
gets its sharding, any other leaf is replicated.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "stage")
Rules = Mapping[str, str | tuple[str, ...] | None] | Sequence[tuple[str, Any]]

# Logical axis -> mesh axis (or axes, tried in order). Unlisted logical names are replicated.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("layers", "stage"),        # GPipe; CoMeT's chunk pipeline replicates layers over stage
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)

# Parameter path suffix (regex over "/"-joined names) -> logical axes of the unstacked tensor.
# The first match wins. Linear kernels are [in, out].
PARAM_AXES = (
    (r"embedding", ("vocab", "embed")),
    (r"head/kernel", ("embed", "vocab")),
    (r"\w*norm/weight", ("norm",)),                          # RMSNorm / GatedRMSNorm, any width
    (r"mlp/(gate|up)/kernel", ("embed", "mlp")),
    (r"mlp/down/kernel", ("mlp", "embed")),
    (r"mixer/[qkvgabl]_proj/kernel", ("embed", "heads")),    # attention, Gated DeltaNet
    (r"mixer/(o|out)_proj/kernel", ("heads", "embed")),
    (r"mixer/in_proj/kernel", ("embed", "mixer_in")),        # Mamba-2's fused [z, x, B, C, dt, λ]
    (r"mixer/conv/weight", ("conv_width", "mixer_in")),
    (r"mixer/conv/bias", ("mixer_in",)),
    (r"mixer/[qkv]_conv/weight", ("conv_width", "heads")),
    (r"mixer/(A_log|D|dt_bias)", ("heads",)),
    (r"mixer/core/lam_scale", ("heads", "lambda")),
    (r"global_net/g_proj/kernel", ("embed", "gate")),       # CoMeT: [2d, 1 | d]
    (r"(o_proj|rla)/down_proj/kernel", ("embed", "rank")),  # CoMeT RLAs
    (r"(o_proj|rla)/up_proj/kernel", ("rank", "embed")),
)
STACKED = ("blocks", "memory_nets")   # module lists stacked on a leading [L] axis ("layers")
_PARAM_AXES = tuple((re.compile(rf"(^|/){pattern}$"), axes) for pattern, axes in PARAM_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, stage: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default `jax.devices()`) with axes `MESH_AXES`, all `AxisType.Auto`.

  One size may be −1: it takes the devices the others leave. Raises ValueError when the sizes do
  not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(zip(MESH_AXES, (data, fsdp, tensor, stage)))
  free = [name for name, size in sizes.items() if size == -1]
  bad = [f"{name}={size}" for name, size in sizes.items() if size != -1 and size < 1]
  if len(free) > 1 or bad:
    raise ValueError(f"make_mesh: sizes must be positive with at most one −1, got {sizes}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"make_mesh: {len(devices)} devices cannot be split as {sizes}")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"make_mesh: mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"got {len(devices)}")
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, (AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def path_name(path) -> str:
  """A pytree key path → "a/b/c" (nnx's trailing `.value` dropped)."""
  names = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
    names.append(str(name))
  if names and names[-1] == "value":
    names.pop()
  return "/".join(names)


def param_axes(name: str, ndim: int) -> tuple[str | None, ...] | None:
  """Logical axes of the parameter at path `name` with `ndim` dims, or None when unknown.

  A tensor under `STACKED` with one more dim than its entry has a leading "layers" axis; 0-d
  tensors have none.
  """
  if ndim == 0:
    return ()
  for pattern, axes in _PARAM_AXES:
    if pattern.search(name):
      stacked = any(part in STACKED for part in name.split("/"))
      if stacked and ndim == len(axes) + 1:
        return ("layers", *axes)
      return axes if ndim == len(axes) else None
  return None


def _state(model_or_state):
  return nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state


def logical_axes(model_or_state, *, strict: bool = True):
  """The tree of `model_or_state` (an nnx Module, its state, a pure dict, or an optax state) with
  each leaf replaced by a `PartitionSpec` of logical axis names.

  strict: unknown parameters raise ValueError (a model); otherwise they get `PartitionSpec()`
  (optimizer states: step counts, factored moments).
  """
  def axes(path, leaf):
    name, ndim = path_name(path), np.ndim(leaf)
    found = param_axes(name, ndim)
    if found is None:
      if strict:
        raise ValueError(f"no logical axes for parameter {name!r} of shape {np.shape(leaf)}; "
                         f"add it to dlax.parallel.mesh.PARAM_AXES")
      found = (None,) * ndim
    return PartitionSpec(*found)

  return jax.tree_util.tree_map_with_path(axes, _state(model_or_state))


def mesh_axes(logical: str | None, dim: int, mesh: Mesh, rules: Rules,
              taken: Sequence[str] = ()) -> tuple[str, ...]:
  """The mesh axes that shard a dim of size `dim` with logical name `logical`: the rule's axes
  that the mesh has and that are not `taken`, cut to the longest prefix whose size divides
  `dim`."""
  target = dict(rules).get(logical) if logical is not None else None
  target = (target,) if isinstance(target, str) else tuple(target or ())
  axes = [a for a in target if a in mesh.shape and a not in taken]
  while axes and dim % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return tuple(axes)


def logical_to_mesh(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """A logical `PartitionSpec` of a tensor of `shape` → its mesh `PartitionSpec`; a mesh axis
  shards at most one dim."""
  out, taken = [], []
  for logical, dim in zip(spec, shape):
    axes = mesh_axes(logical, dim, mesh, rules, taken)
    taken.extend(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def _shardings(tree, mesh: Mesh, rules: Rules, strict: bool):
  def sharding(spec, x):
    return NamedSharding(mesh, logical_to_mesh(spec, np.shape(x), mesh, rules))

  return jax.tree.map(sharding, logical_axes(tree, strict=strict), _state(tree),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(model_or_state, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
  """`NamedSharding`s of a model's state (same tree as `nnx.state(model)` / `nnx.split`'s state,
  or a pure dict), for `jax.jit(in_shardings=..., out_shardings=...)` and `jax.device_put`.
  Works on abstract states (`nnx.eval_shape`). Raises ValueError for a parameter not in
  `PARAM_AXES`."""
  return _shardings(model_or_state, mesh, rules, strict=True)


def optimizer_shardings(opt_state, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES):
  """`NamedSharding`s of an optax state built on a model's params: moments shard like their
  parameters, anything else (counts, factored statistics) is replicated."""
  return _shardings(opt_state, mesh, rules, strict=False)


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
  """Shards the leading (batch) dim over the "batch" rule's axes, e.g. ('data', 'fsdp'); apply it
  to every leaf of a batch (the batch size must divide by their product)."""
  axes = mesh_axes("batch", 0, mesh, rules)             # dim 0: every size divides
  return NamedSharding(mesh, PartitionSpec(axes or None))

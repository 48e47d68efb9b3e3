"""CoMeT parameter groups and optimizer (spec §4, §9).

Everything trains (reference implementation), the memory nets at `MEMORY_LR_MULTIPLIER` × the base
learning rate. With `CometConfig.freeze_backbone` (library choice) only the memory nets and the
new embedding rows (the §3 special tokens) train.

    labels = param_labels(model)
    tx = comet_optimizer(schedule, labels=labels, decay_mask=weight_decay_mask(model))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

`comet_optimizer_for(model, schedule)` does the same (and passes the new-row mask when frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

MEMORY_LR_MULTIPLIER = 5.0

# Group labels.
BACKBONE = "backbone"
MEMORY = "memory"
FROZEN = "frozen"
NEW_EMBEDDING_ROWS = "new_embedding_rows"   # the embedding under freeze_backbone

# Subtrees whose params carry a leading [L] layer axis.
_STACKED = (("backbone", "blocks"), ("memory_nets",))
_EMBEDDING = ("backbone", "embedding")


def _param_state(model_or_state) -> nnx.State:
  if isinstance(model_or_state, nnx.Module):
    return nnx.state(model_or_state, nnx.Param)
  return model_or_state


def _map_paths(model_or_state, fn) -> nnx.State:
  """A State shaped like the params whose leaf at `path` is `fn(path, array)`."""
  array = lambda value: value[...] if isinstance(value, nnx.Variable) else value
  return nnx.from_flat_state([(path, fn(path, array(value)))
                              for path, value in nnx.to_flat_state(_param_state(model_or_state))])


def param_labels(model_or_state, *, freeze_backbone: bool | None = None) -> nnx.State:
  """The optimizer group of every parameter of a `CometForCausalLM` (or of its
  `nnx.state(model, nnx.Param)`): a State of the same structure, also a prefix of its pure form,
  with leaves MEMORY (memory nets) and BACKBONE (everything else).

  `freeze_backbone` (default: the model's `config.freeze_backbone`; False for a State) labels the
  backbone FROZEN except the embedding, labelled NEW_EMBEDDING_ROWS: its new token rows (§3) must
  keep training (§4), so `comet_optimizer` then needs `new_rows_mask`.
  """
  if freeze_backbone is None:
    freeze_backbone = (isinstance(model_or_state, nnx.Module)
                       and model_or_state.config.freeze_backbone)

  def label(path, _):
    if path[0] == "memory_nets":
      return MEMORY
    if not freeze_backbone:
      return BACKBONE
    return NEW_EMBEDDING_ROWS if tuple(path) == _EMBEDDING else FROZEN

  return _map_paths(model_or_state, label)


def weight_decay_mask(model_or_state) -> nnx.State:
  """True for the params that AdamW decays: those with ndim ≥ 2 per layer (§9: ndim ≤ 1 params,
  i.e. norm weights, are never decayed). Stacked layer params drop their leading [L] axis first."""
  def decayed(path, value):
    stacked = any(tuple(path[:len(prefix)]) == prefix for prefix in _STACKED)
    return np.ndim(value) - stacked >= 2

  return _map_paths(model_or_state, decayed)


def new_embedding_rows_mask(model, first_new_row: int | None = None) -> np.ndarray:
  """`[V]` bool: the embedding rows that train under `freeze_backbone`, i.e. rows ≥
  `first_new_row` (default: the smallest special id of `model.config`, the placeholder for §3)."""
  config = model.config
  if first_new_row is None:
    first_new_row = min(config.placeholder_id, config.temp_beacon_id, *config.global_beacon_ids)
  return np.arange(model.backbone.embedding[...].shape[0]) >= first_new_row


def _keep_rows(rows: np.ndarray) -> optax.GradientTransformation:
  """Zeroes the updates of the embedding rows outside `rows` `[V]`."""
  rows = jnp.asarray(rows)
  keep = lambda u: jnp.where(rows.reshape(-1, *[1] * (u.ndim - 1)), u, 0)
  return optax.stateless(lambda updates, params=None: jax.tree.map(keep, updates))


def comet_optimizer(learning_rate, *, labels, decay_mask, weight_decay: float = 0.0,
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    clip_norm: float | None = 1.5,
                    new_rows_mask: np.ndarray | None = None) -> optax.GradientTransformation:
  """The §9 optimizer over parameter groups `labels` (`param_labels`).

  1. FROZEN gradients, and those of embedding rows outside `new_rows_mask` `[V]`, are zeroed.
  2. The global norm of the rest is clipped to `clip_norm` (None: no clipping).
  3. AdamW (decoupled weight decay on the params where `decay_mask`, see `weight_decay_mask`) with
     `learning_rate` (a float or a schedule of the step) on BACKBONE and NEW_EMBEDDING_ROWS, and
     `MEMORY_LR_MULTIPLIER` × it on MEMORY. FROZEN params get zero updates.
  """
  if not callable(labels) and NEW_EMBEDDING_ROWS in jax.tree.leaves(labels) \
      and new_rows_mask is None:
    raise ValueError("labels contain NEW_EMBEDDING_ROWS (freeze_backbone): pass new_rows_mask")
  memory_lr = ((lambda step: MEMORY_LR_MULTIPLIER * learning_rate(step))
               if callable(learning_rate) else MEMORY_LR_MULTIPLIER * learning_rate)
  adamw = lambda lr: optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                 mask=decay_mask)
  identity = optax.identity()
  zero_frozen = {BACKBONE: identity, MEMORY: identity, FROZEN: optax.set_to_zero()}
  steps = {BACKBONE: adamw(learning_rate), MEMORY: adamw(memory_lr), FROZEN: optax.set_to_zero()}
  if new_rows_mask is not None:
    zero_frozen[NEW_EMBEDDING_ROWS] = _keep_rows(new_rows_mask)
    steps[NEW_EMBEDDING_ROWS] = optax.chain(adamw(learning_rate), _keep_rows(new_rows_mask))
  clip = identity if clip_norm is None else optax.clip_by_global_norm(clip_norm)
  return optax.chain(optax.multi_transform(zero_frozen, labels), clip,
                     optax.multi_transform(steps, labels))


def comet_optimizer_for(model, learning_rate, **kwargs) -> optax.GradientTransformation:
  """`comet_optimizer` with the labels, decay mask and (under `freeze_backbone`) new-row mask of
  `model`; `kwargs` as there."""
  labels = param_labels(model)
  if model.config.freeze_backbone:
    kwargs.setdefault("new_rows_mask", new_embedding_rows_mask(model))
  return comet_optimizer(learning_rate, labels=labels, decay_mask=weight_decay_mask(model),
                         **kwargs)

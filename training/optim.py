"""The optimizer of a `TrainConfig`: AdamW, warm-up + cosine (or constant) schedule, global-norm
clipping, weight-decay masks, and CoMeT's memory learning rate.

The transformation acts on the parameters `nnx.state(model, nnx.Param)` (or their pure form):

    tx = build_optimizer(config, model)
    params = nnx.state(model, nnx.Param)
    opt_state = tx.init(params)
    lr = learning_rate_schedule(config)(step)        # for logging

Gradients, moments and updates have the parameters' dtype: fp32 master weights under the default
dtype policy (`param_dtype` float32 with bf16 compute; see `dlax_training.config`).
"""

from __future__ import annotations

import numpy as np
import optax
from flax import nnx

from dlax.layers.multistate import LambdaScale
from dlax.models.comet.params import (MEMORY, MEMORY_LR_MULTIPLIER, comet_optimizer_for,
                                      param_labels)
from dlax_training.config import TrainConfig

STACKED = "blocks"   # LanguageModel params under this key carry a leading [n_layers] axis


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """The step → learning-rate function: linear warm-up from 0 to `optimizer.lr` over
  `schedule.warmup_steps`, then cosine decay to `min_lr_ratio` × lr at `config.schedule_steps`
  (held there afterwards), or constant."""
  schedule, peak = config.schedule, config.optimizer.lr
  warmup = schedule.warmup_steps
  if schedule.kind == "constant":
    after = optax.constant_schedule(peak)
  else:
    after = optax.cosine_decay_schedule(peak, max(config.schedule_steps - warmup, 1),
                                        alpha=schedule.min_lr_ratio)
  if warmup == 0:   # (optax's warm-up schedules stay at 0 for zero warm-up steps)
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def weight_decay_mask(model: nnx.Module) -> nnx.State:
  """True for the `LanguageModel` params that AdamW decays: matrices, i.e. ndim ≥ 2 once the
  stacked [L] layer axis is dropped (embedding, head and projection kernels, conv weights).
  Norm weights, biases, A_log, D, dt_bias and the `LambdaScale` λ-scales are never decayed."""
  def decayed(path, variable) -> bool:
    per_layer_ndim = np.ndim(variable.get_value()) - (path[0] == STACKED)
    return per_layer_ndim >= 2 and not isinstance(variable, LambdaScale)

  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return nnx.from_flat_state([(path, decayed(path, variable)) for path, variable in flat])


def _lm_optimizer(config: TrainConfig, model, schedule) -> optax.GradientTransformation:
  opt = config.optimizer
  clip = optax.identity() if opt.clip_norm is None else optax.clip_by_global_norm(opt.clip_norm)
  return optax.chain(clip, optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                       weight_decay=opt.weight_decay,
                                       mask=weight_decay_mask(model)))


def _comet_optimizer(config: TrainConfig, model, schedule) -> optax.GradientTransformation:
  """`dlax.models.comet.params.comet_optimizer_for` (groups, decay mask, frozen backbone)."""
  opt = config.optimizer
  tx = comet_optimizer_for(model, schedule, weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2,
                           eps=opt.eps, clip_norm=opt.clip_norm)
  ratio = opt.memory_lr_multiplier / MEMORY_LR_MULTIPLIER
  if ratio == 1.0:
    return tx
  # comet_optimizer runs the memory group at MEMORY_LR_MULTIPLIER × lr; AdamW's update (decay
  # included) is linear in the learning rate, so rescaling that group's updates sets the multiplier.
  labels = param_labels(model)
  groups = {label: optax.scale(ratio) if label == MEMORY else optax.identity()
            for _, label in nnx.to_flat_state(labels)}
  return optax.chain(tx, optax.multi_transform(groups, labels))


def build_optimizer(config: TrainConfig, model: nnx.Module) -> optax.GradientTransformation:
  """The optimizer of `config` for `model` (a `LanguageModel` for task "lm", a
  `CometForCausalLM` for task "comet"); see the module docstring."""
  schedule = learning_rate_schedule(config)
  if config.task == "comet":
    return _comet_optimizer(config, model, schedule)
  return _lm_optimizer(config, model, schedule)

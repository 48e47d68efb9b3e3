"""Log-Linear and DLA language models: prefill + decode equals one pass (with capacity merges in
both), T-independent caches, per-layer DLA metrics, configs, presets and parameter counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.layers import multistate
from dlax.models import (MIXERS, MULTISTATE_MIXERS, PRESETS, DLAConfig, LanguageModel,
                         LogLinearConfig, paper_config, tiny_config)
from model_helpers import decode_step, prefill, random_tokens, rel_err, tiny_model

PROMPT, STEPS = 13, 7                               # prompt not a multiple of chunk 8
LENGTH = PROMPT + STEPS
MODES = ("log_linear", "dla")


@nnx.jit
def _forward_with_metrics(model, tokens):
  return model(tokens, return_metrics=True)


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _count_params(config) -> int:
  abstract = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _heads(config) -> int:
  if config.mixer == "mamba2":
    return config.d_model * config.mamba2.expand // config.mamba2.headdim
  return config.gated_delta.num_heads


def _check_dla_metrics(model, tokens, metrics, record):
  """Shapes and ranges of the `[L, H]` metrics, and layer 0's against the op's decision record
  for that layer's input (a direct call of block 0's mixer)."""
  config = model.config
  assert set(metrics) == set(multistate.METRIC_NAMES)
  for value in metrics.values():
    assert value.shape == (config.n_layers, _heads(config)) and value.dtype == jnp.float32
  rate = np.asarray(metrics["boundary_rate"])
  assert np.all(rate > 0) and np.all(rate < 1), rate
  np.testing.assert_array_less(0, metrics["occupancy"])
  np.testing.assert_array_less(metrics["occupancy"], 1 + 1e-6)
  assert np.all(np.asarray(metrics["mean_block_length"]) >= 1)

  graphdef, state = nnx.split(model.blocks)
  block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))

  @nnx.jit
  def layer_zero(block, x):
    _, _, layer_metrics = block.mixer(block.mixer_norm(x), return_metrics=True)
    return layer_metrics, record["aux"]

  layer_metrics, aux = layer_zero(block, model.embedding[...][tokens])
  np.testing.assert_allclose(np.asarray(aux.boundary).mean(axis=(0, 1)), rate[0], rtol=1e-6)
  merges = (np.asarray(aux.merge_idx) >= 0).sum(axis=1).mean(axis=0)
  np.testing.assert_allclose(merges, metrics["merges"][0], rtol=1e-6)
  for name in multistate.METRIC_NAMES:
    np.testing.assert_allclose(layer_metrics[name], metrics[name][0], rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mixer", MULTISTATE_MIXERS)
def test_prefill_then_decode_equals_full_pass(rng, mixer, mode, dla_op_record):
  """float64, so that no boundary decision sits within rounding of τ; K = 3 and τ = 0.7 so that
  boundaries are neither rare nor certain and capacity merges occur in prefill and decode."""
  model = tiny_model(mixer, rng, multistate=mode, dla=DLAConfig(capacity=3, tau=0.7),
                     log_linear=LogLinearConfig(num_levels=4), dtype="float64",
                     param_dtype="float64")
  tokens = random_tokens(rng, (2, LENGTH))
  full, metrics = _forward_with_metrics(model, tokens)
  logits, cache = prefill(model, tokens[:, :PROMPT], max_len=LENGTH)
  prefill_shapes = _shapes(cache)
  assert prefill_shapes == _shapes(model.init_cache(2, 4096))          # independent of T
  steps = [logits]
  for t in range(PROMPT, LENGTH):
    logits, cache = decode_step(model, tokens[:, t], cache)
    steps.append(logits[:, None])
  assert _shapes(cache) == prefill_shapes
  assert rel_err(jnp.concatenate(steps, axis=1), full) <= 1e-9
  if mode == "log_linear":
    assert metrics == {} and cache.layers[-1].S.shape[3] == 32     # levels for any length
    return
  # Decisions are causal, so the prompt's own pass counts the merges made during prefill.
  prompt_logits, prompt_metrics = _forward_with_metrics(model, tokens[:, :PROMPT])
  assert rel_err(prompt_logits, steps[0]) <= 1e-9
  assert np.sum(prompt_metrics["merges"]) > 0, "no capacity merge during prefill"
  assert np.sum(metrics["merges"] - prompt_metrics["merges"]) > 0, "no merge during decode"
  _check_dla_metrics(model, tokens, metrics, dla_op_record)


def test_base_models_return_empty_metrics(rng):
  model = tiny_model("attention", rng)
  logits, metrics = model(random_tokens(rng, (1, 4)), return_metrics=True)
  assert logits.shape == (1, 4, 256) and metrics == {}


def test_presets_and_lambda_parameter_counts():
  """Every backbone × mode builds at both scales; each layer gains exactly d·H·Kλ + H·Kλ."""
  for mixer in MIXERS:
    modes = ("none", *MODES) if mixer in MULTISTATE_MIXERS else ("none",)
    for mode in modes:
      for scale, make in (("tiny", tiny_config), ("paper", paper_config)):
        config = make(mixer, mode)
        assert config.multistate == mode
        key = f"{mixer}-{scale}" if mode == "none" else f"{mixer}-{mode}-{scale}"
        assert PRESETS[key] == config
        if mode == "none":
          continue
        k_lam = config.dla.capacity if mode == "dla" else config.log_linear.num_levels
        h, d = _heads(config), config.d_model
        extra = _count_params(config) - _count_params(make(mixer))
        assert extra == config.n_layers * (d * h * k_lam + h * k_lam), (key, extra)
  paper = {m: PRESETS[f"{m}-dla-paper"] for m in MULTISTATE_MIXERS}
  assert all((c.dla.capacity, c.dla.tau, c.dla.lambda_count) == (30, 0.6, 30)
             for c in paper.values())
  assert PRESETS["gated_delta-log_linear-paper"].log_linear.num_levels == 15
  per_layer = {m: (_count_params(c) - _count_params(paper_config(m))) / c.n_layers
               for m, c in paper.items()}
  assert per_layer == {"mamba2": 1536 * 48 * 30 + 48 * 30, "gated_delta": 1536 * 6 * 30 + 6 * 30}
  assert round(per_layer["mamba2"] / 1e6, 1) == 2.2 and round(per_layer["gated_delta"] / 1e6,
                                                                 2) == 0.28


@pytest.mark.parametrize("make, message", [
    (lambda: DLAConfig(capacity=1), "DLAConfig: capacity must be an int >= 2"),
    (lambda: DLAConfig(capacity=4, num_lambda=5), r"num_lambda must be .*\[1, capacity=4\]"),
    (lambda: DLAConfig(num_lambda=0), "num_lambda must be"),
    (lambda: DLAConfig(tau=float("nan")), "tau must not be NaN"),
    (lambda: DLAConfig(score_ref="base"), "score_ref must be one of"),
    (lambda: DLAConfig(eps=0.0), "eps and eps_r must be positive"),
    (lambda: LogLinearConfig(num_levels=0), "num_levels must be a positive int"),
    (lambda: tiny_config("mamba2", "both"), "multistate must be one of"),
    (lambda: tiny_config("attention", "dla"), "multistate='dla' needs a mixer in"),
    (lambda: tiny_config("gated_delta", "log_linear", chunk_size=12),
     "needs a power-of-two chunk_size"),
    (lambda: tiny_config("mamba2", "dla", dla=30), "dla must be a DLAConfig"),
])
def test_invalid_multistate_configs_raise(make, message):
  with pytest.raises(ValueError, match=message):
    make()

"""CoMeT config and token layout (spec §5, §6, §8.1, §12.2; §15 properties 3 and 10)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dlax.models.comet import (IGNORE_LABEL, OFFICIAL_CLASS_DEFAULTS, CometConfig, build_batch,
                               build_chunk, build_layout, build_layout_exact, build_prompt_layout,
                               chunk_counts, exact_lengths, fixed_plan, right_aligned_plan,
                               tiny_comet_config, uniform_plan, validate_plan)

# Worked example of §6.2: C=16, G=2, s=4, Bt=8; ids 1..40 are text, 100 = M, 101/102 = R0/R1,
# 103 = c.
M, R0, R1, B = 100, 101, 102, 103
X = IGNORE_LABEL


@pytest.fixture
def example_config() -> CometConfig:
  return tiny_comet_config(first_special_id=M, global_mem_size=2)


def _text(start: int, stop: int) -> list[int]:
  """start..stop with a `c` after every 4 tokens (the text of one chunk, 1-based)."""
  out = []
  for t in range(start, stop + 1):
    out.append(t)
    if (t - start + 1) % 4 == 0:
      out.append(B)
  return out


def test_worked_example(example_config):
  layout = build_layout(np.arange(1, 41), None, [16, 16, 8], example_config)
  lmax = example_config.max_chunk_len
  assert lmax == 2 * 2 + 8 + 16 + 4 == layout.input_ids.shape[1]
  expected_ids = [
      _text(1, 16) + [R0, R1],
      [M] * 2 + [M] * 4 + _text(17, 32) + [R0, R1],
      [M] * 2 + [M] * 8 + _text(33, 40) + [R0, R1],
  ]
  np.testing.assert_array_equal(layout.n_valid, [22, 28, 22])
  for tau, ids in enumerate(expected_ids):
    n = len(ids)
    np.testing.assert_array_equal(layout.input_ids[tau, :n], ids)
    np.testing.assert_array_equal(layout.input_ids[tau, n:], M)       # pad id = placeholder
    np.testing.assert_array_equal(layout.labels[tau, n:], X)
    np.testing.assert_array_equal(layout.positions[tau], np.minimum(np.arange(lmax), n))
  np.testing.assert_array_equal(
      layout.labels[0, :22],
      [2, 3, 4, 5, X, 6, 7, 8, 9, X, 10, 11, 12, 13, X, 14, 15, 16, 17, X, X, X])
  np.testing.assert_array_equal(layout.labels[1, :6], X)
  np.testing.assert_array_equal(layout.labels[2, 10:22],
                                [34, 35, 36, 37, X, 38, 39, 40, X, X, X, X])   # -100 past the end

  inv = lmax
  np.testing.assert_array_equal(layout.comp_idx, [[4, 9, 14, 19], [10, 15, 20, 25],
                                                  [14, 19, inv, inv]])
  np.testing.assert_array_equal(layout.n_comp, [4, 4, 2])
  np.testing.assert_array_equal(layout.readout_idx, [[20, 21], [26, 27], [20, 21]])
  np.testing.assert_array_equal(layout.gslot_idx, [[inv, inv], [0, 1], [0, 1]])
  np.testing.assert_array_equal(layout.tslot_idx, [[inv] * 8, [2, 3, 4, 5] + [inv] * 4,
                                                   list(range(2, 10))])
  np.testing.assert_array_equal(layout.n_temp, [0, 4, 8])
  np.testing.assert_array_equal(layout.text_idx[2], [10, 11, 12, 13, 15, 16, 17, 18] + [inv] * 8)
  np.testing.assert_array_equal(layout.is_first, [True, False, False])
  np.testing.assert_array_equal(layout.has_global, [False, True, True])
  np.testing.assert_array_equal(layout.has_readout, [True, True, True])


def test_default_static_lengths():
  config = CometConfig()
  assert (config.global_mem_size, config.num_comp, config.max_chunk_len) == (512, 256, 5376)
  lengths = exact_lengths(config)
  assert lengths == [2816, 3584, 3840, 4096, 4352, 4608, 4864, 5120] + [5376] * 8
  assert sum(lengths) == 76_288
  assert config.num_chunks * config.max_chunk_len == 86_016


def _random_plan(rng, n_tokens: int, chunk_size: int) -> list[int]:
  plan = []
  while n_tokens:
    size = int(rng.integers(1, min(chunk_size, n_tokens) + 1))
    plan.append(size)
    n_tokens -= size
  return plan


def _random_example(rng, config: CometConfig):
  n_tokens = int(rng.integers(1, config.max_seq_length + 1))
  ids = rng.integers(0, 90, n_tokens)
  labels = np.where(rng.random(n_tokens) < 0.3, IGNORE_LABEL, ids)
  return ids, labels, _random_plan(rng, n_tokens, config.chunk_size)


@pytest.mark.parametrize("overrides", [{}, {"temp_beacon_stride": 3}, {"temp_beacon_stride": -1},
                                       {"global_beacon_ids": ()}, {"temp_mem_budget": 5}])
def test_random_plans_preserve_text_and_labels(rng, overrides):
  config = dataclasses.replace(tiny_comet_config(first_special_id=M), **overrides)
  specials = {config.placeholder_id, config.temp_beacon_id, *config.global_beacon_ids}
  for _ in range(20):
    ids, labels, plan = _random_example(rng, config)
    layout = build_layout(ids, labels, plan, config)
    length = layout.input_ids.shape[1]
    valid = layout.text_idx < length
    np.testing.assert_array_equal(valid.sum(1), plan)
    rows = np.broadcast_to(np.arange(len(plan))[:, None], valid.shape)
    gathered = layout.input_ids[rows[valid], layout.text_idx[valid]]
    np.testing.assert_array_equal(gathered, ids)                   # every token once, in order
    shifted = np.append(labels[1:], IGNORE_LABEL)
    np.testing.assert_array_equal(layout.labels[rows[valid], layout.text_idx[valid]], shifted)
    # Only text slots carry labels; every special slot and padding is -100.
    is_special = np.isin(layout.input_ids, list(specials))
    assert np.all(layout.labels[is_special] == IGNORE_LABEL)
    assert np.all(layout.labels[layout.positions == layout.n_valid[:, None]] == IGNORE_LABEL)
    # Index tables agree with the ids they point at.
    for idx, token in ((layout.comp_idx, config.temp_beacon_id),
                       (layout.gslot_idx, config.placeholder_id),
                       (layout.tslot_idx, config.placeholder_id)):
      ok = idx < length
      assert np.all(layout.input_ids[np.nonzero(ok)[0], idx[ok]] == token)
    ok = layout.readout_idx < length
    np.testing.assert_array_equal(layout.input_ids[np.nonzero(ok)[0], layout.readout_idx[ok]],
                                  np.broadcast_to(config.global_beacon_ids, ok.shape)[ok])
    assert np.all(layout.n_valid <= config.max_chunk_len)
    earlier = np.cumsum(layout.n_comp) - layout.n_comp
    np.testing.assert_array_equal(layout.n_temp, np.minimum(config.temp_capacity, earlier))


def test_label_rules(example_config):
  """§15.10: the token before a `<beacon>` predicts the next text token; chunk boundaries."""
  ids = np.arange(1, 41)
  layout = build_layout(ids, None, [16, 16, 8], example_config)
  for tau in range(3):
    beacons = layout.comp_idx[tau][layout.comp_idx[tau] < layout.n_valid[tau]]
    before = layout.input_ids[tau, beacons - 1]
    want = np.where(before < 40, before + 1, X)                     # token 40 ends the sequence
    np.testing.assert_array_equal(layout.labels[tau, beacons - 1], want)
    np.testing.assert_array_equal(layout.labels[tau, beacons], X)
  last = lambda tau: layout.text_idx[tau, layout.n_text[tau] - 1]
  assert layout.labels[0, last(0)] == 17 and layout.labels[1, last(1)] == 33
  assert layout.labels[2, last(2)] == X


def test_exact_layout_matches_uniform(rng):
  config = tiny_comet_config()
  ids, labels, plan = _random_example(rng, config)
  uniform = build_layout(ids, labels, plan, config)
  exact = build_layout_exact(ids, labels, plan, config)
  for tau, (chunk, length) in enumerate(zip(exact, exact_lengths(config, len(plan)))):
    assert chunk.input_ids.shape == chunk.labels.shape == chunk.positions.shape == (length,)
    np.testing.assert_array_equal(chunk.input_ids, uniform.input_ids[tau, :length])
    np.testing.assert_array_equal(chunk.labels, uniform.labels[tau, :length])
    np.testing.assert_array_equal(chunk.text_idx,
                                  np.minimum(uniform.text_idx[tau], length))
  assert exact_lengths(config)[-1] == config.max_chunk_len


def test_full_length_sample_fills_exact_lengths():
  config = tiny_comet_config()
  n = config.max_seq_length
  layout = build_layout(np.arange(n) % 50, None, fixed_plan(n, config.chunk_size), config)
  np.testing.assert_array_equal(layout.n_valid, exact_lengths(config))


def test_build_chunk_matches_layout(example_config):
  ids = np.arange(1, 41)
  layout = build_layout(ids, None, [16, 16, 8], example_config)
  counts = chunk_counts([16, 16, 8], example_config)
  one = lambda tau: type(counts)(*(c[tau] for c in counts))
  chunk = build_chunk(ids[16:32], ids[17:33], one(1), example_config,
                      example_config.max_chunk_len)
  for got, want in zip(chunk, layout):
    np.testing.assert_array_equal(got, want[1])


def test_batch_pads_plans_with_empty_chunks():
  config = tiny_comet_config()
  examples = [(np.arange(1, 41), None, [16, 16, 8]), (np.arange(1, 11), None, None)]
  batch = build_batch(examples, config, n_chunks=4)
  assert batch.input_ids.shape == (2, 4, config.max_chunk_len)
  np.testing.assert_array_equal(batch.n_text, [[16, 16, 8, 0], [10, 0, 0, 0]])
  empty = batch.n_text == 0
  assert np.all(batch.n_valid[empty] == 0) and np.all(batch.labels[empty] == X)
  assert not np.any(batch.has_global[empty] | batch.has_readout[empty])
  for name in ("gslot_idx", "tslot_idx", "comp_idx", "readout_idx", "text_idx"):
    assert np.all(getattr(batch, name)[empty] == config.max_chunk_len)
  exact = build_batch(examples, config, layout="exact")
  assert [c.input_ids.shape for c in exact] == [(2, n) for n in exact_lengths(config, 3)]


def test_generation_layout(example_config):
  prompt = np.arange(1, 39)                                         # plan [16, 16, 6]
  clean = build_prompt_layout(prompt, example_config)
  np.testing.assert_array_equal(clean.n_comp, [4, 4, 1])            # no trailing beacon at the end
  np.testing.assert_array_equal(clean.has_readout, [True, True, False])
  np.testing.assert_array_equal(clean.n_valid, [22, 28, 2 + 8 + 6 + 1])
  np.testing.assert_array_equal(clean.input_ids[2, :17], [M] * 10 + [33, 34, 35, 36, B, 37, 38])
  assert np.all(clean.labels == X)

  official = build_prompt_layout(prompt, example_config, official=True)
  np.testing.assert_array_equal(official.n_comp, [3, 3, 1])         # every chunk drops its last
  np.testing.assert_array_equal(official.n_temp, [0, 3, 6])
  np.testing.assert_array_equal(official.input_ids[0, :21], _text(1, 16)[:-1] + [R0, R1])
  np.testing.assert_array_equal(official.readout_idx[0], [19, 20])
  assert np.array_equal(
      build_prompt_layout(prompt, dataclasses.replace(example_config,
                                                      generation_layout="official")).input_ids,
      official.input_ids)

  aligned = build_prompt_layout(np.arange(1, 33), example_config)   # multiple of s: group continues
  np.testing.assert_array_equal(aligned.n_comp, [4, 3])
  single = build_prompt_layout(np.arange(1, 6), example_config)     # one chunk: no memory/readouts
  np.testing.assert_array_equal(single.input_ids[0, :single.n_valid[0]], [1, 2, 3, 4, B, 5])


def test_plans():
  np.testing.assert_array_equal(fixed_plan(40, 16), [16, 16, 8])
  np.testing.assert_array_equal(fixed_plan(32, 16), [16, 16])
  np.testing.assert_array_equal(right_aligned_plan(40, 16), [8, 16, 16])
  np.testing.assert_array_equal(uniform_plan(40, 3), [14, 13, 13])
  assert fixed_plan(0, 16).size == 0
  validate_plan([16, 8, 0, 0], 16, n_tokens=24)
  for bad, message in (([17], "lie in"), ([-1, 4], "lie in"), ([4, 0, 4], "trail"),
                       ([1.5], "ints"), ([[4]], "1-D")):
    with pytest.raises(ValueError, match=message):
      validate_plan(bad, 16)
  with pytest.raises(ValueError, match="covers 8 tokens"):
    validate_plan([4, 4], 16, n_tokens=9)


@pytest.mark.parametrize("overrides, message", [
    ({"chunk_size": 0}, "chunk_size"),
    ({"max_seq_length": 40}, "divisible"),
    ({"temp_beacon_stride": 0}, "temp_beacon_stride"),
    ({"temp_beacon_stride": -2}, "temp_beacon_stride"),
    ({"temp_mem_budget": -1}, "temp_mem_budget"),
    ({"rla_rank": True}, "rla_rank"),
    ({"temp_beacon_id": 241}, "distinct"),
    ({"global_beacon_ids": (1, 1)}, "distinct"),
    ({"global_beacon_ids": None}, "global_beacon_ids"),
    ({"placeholder_id": -3}, "non-negative"),
    ({"eps_temp_norm": 0.0}, "eps_temp_norm"),
    ({"layout": "ragged"}, "layout"),
    ({"fifo_mode": "x"}, "fifo_mode"),
    ({"generation_layout": "x"}, "generation_layout"),
    ({"gate": "x"}, "gate"),
    ({"state_dtype": "int32"}, "state_dtype"),
])
def test_config_validation(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(tiny_comet_config(), **overrides)


def test_config_derived_sizes():
  config = tiny_comet_config(global_beacon_ids=[241, 242, 243])     # lists become tuples
  assert config.global_beacon_ids == (241, 242, 243) and config.global_mem_size == 3
  assert (config.num_comp, config.max_chunk_len) == (4, 2 * 3 + 8 + 16 + 4)
  off = dataclasses.replace(config, temp_beacon_stride=-1, global_beacon_ids=())
  assert (off.use_global, off.use_temp, off.num_comp, off.max_chunk_len) == (False, False, 0, 16)
  assert dataclasses.replace(config, temp_beacon_stride=5).num_comp == 4   # ceil(16 / 5)
  assert dataclasses.replace(config, state_dtype="float32").state_dtype == "float32"


def test_hf_fields_round_trip():
  config = CometConfig(max_seq_length=65536, fifo_mode="official")
  fields = config.to_hf_fields()
  assert fields["global_beacon_ids"] == list(range(151670, 152182))
  assert (fields["placeholder_id"], fields["temp_beacon_id"]) == (151669, 152182)
  assert "global_mem_size" not in fields and "max_seq_length" not in fields
  back = CometConfig.from_hf_fields({**fields, "hidden_size": 2560}, max_seq_length=65536,
                                    fifo_mode="official")
  assert back == config and back.to_hf_fields() == fields
  assert back.global_mem_size == 512

  defaults = CometConfig.from_hf_fields({"global_beacon_ids": [5, 6]})
  assert {k: getattr(defaults, k) for k in OFFICIAL_CLASS_DEFAULTS if k != "global_beacon_ids"} \
      == {"chunk_size": 512, "placeholder_id": 128000, "temp_beacon_id": 128001,
          "temp_beacon_stride": 8, "temp_mem_budget": 128}
  assert defaults.global_mem_size == 2
  with pytest.raises(ValueError, match="global_beacon_ids"):
    CometConfig.from_hf_fields({"chunk_size": 2048})
  with pytest.raises(ValueError, match="overrides"):
    CometConfig.from_hf_fields(fields, chunk_size=1024)

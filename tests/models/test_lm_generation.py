"""`dlax.models.lm_generation.generate`: greedy decoding equals re-running the full forward pass
on the growing text, for every mixer and the multi-state cores; eos, padding, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlax.models import MIXERS
from dlax.models.lm_generation import generate
from model_helpers import forward, tiny_model

MODELS = [(mixer, "none") for mixer in MIXERS] + [("mamba2", "dla"), ("gated_delta", "log_linear")]


def greedy_reference(model, prompt, steps: int, width: int) -> list[int]:
  """Argmax of a fresh full forward pass over prompt + everything generated so far. The text is
  right-padded to `width` (one compiled shape; the models are causal, so the padding cannot
  reach the logits read at the text's last position)."""
  text = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(text)] = text
    logits = forward(model, jnp.asarray(padded))
    text.append(int(jnp.argmax(logits[0, len(text) - 1])))
  return text[len(prompt):]


def random_prompts(rng, lengths):
  return [rng.integers(0, 256, size=n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("mixer, multistate", MODELS)
def test_greedy_equals_full_forward_reference(rng, mixer, multistate):
  model = tiny_model(mixer, rng, multistate=multistate)
  prompts = random_prompts(rng, [11, 3, 11])          # two prompt lengths: two batches
  out = generate(model, prompts, 6)
  assert out.tokens.shape == (3, 6) and out.tokens.dtype == np.int32
  np.testing.assert_array_equal(out.num_tokens, [6, 6, 6])
  for row, prompt in enumerate(prompts):
    assert out.tokens[row].tolist() == greedy_reference(model, prompt, 6, width=17), row


def test_eos_ends_a_row_and_pads_it(rng):
  model = tiny_model("mamba2", rng)
  prompts = random_prompts(rng, [9, 9])
  greedy = generate(model, prompts, 6).tokens
  eos = int(greedy[0, 2])
  first = int(np.flatnonzero(greedy[0] == eos)[0])
  out = generate(model, prompts, 6, eos_token_id=eos, pad_token_id=255)
  assert out.num_tokens[0] == first + 1
  np.testing.assert_array_equal(out.tokens[0, :first + 1], greedy[0, :first + 1])
  assert (out.tokens[0, first + 1:] == 255).all()
  ends = np.flatnonzero(greedy[1] == eos)
  assert out.num_tokens[1] == (ends[0] + 1 if ends.size else 6)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(rng):
  model = tiny_model("attention", rng)
  prompts = random_prompts(rng, [7])
  sample = lambda seed, **kw: generate(model, prompts, 8, temperature=1.0, seed=seed, **kw).tokens
  np.testing.assert_array_equal(sample(3), sample(3))
  assert not np.array_equal(sample(3), sample(4))
  np.testing.assert_array_equal(sample(5, top_p=1e-6), generate(model, prompts, 8).tokens)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([np.zeros(0, np.int32)], {}, "non-empty 1-D"),
    ([np.zeros((2, 3), np.int32)], {}, "non-empty 1-D"),
    ([np.array([1, 256], np.int32)], {}, r"token ids must lie in \[0, 256\)"),
    ([np.array([1.0, 2.0])], {}, "integer"),
    ([np.array([1, 2], np.int32)], {"max_new_tokens": 0}, "positive int"),
    ([np.array([1, 2], np.int32)], {"top_p": 0.0}, "top_p"),
])
def test_bad_inputs(rng, prompts, kwargs, message):
  model = tiny_model("mamba2", rng)
  with pytest.raises(ValueError, match=message):
    generate(model, prompts, **{"max_new_tokens": 4, **kwargs})

"""LanguageModel input checks: token dtype, rank and range; NaN for bad ids under jit."""

import jax.numpy as jnp
import numpy as np
import pytest

from model_helpers import forward, random_tokens, tiny_model


@pytest.fixture
def model(rng):
  return tiny_model("attention", rng)


@pytest.mark.parametrize("bad_id", [256, 1000, -1])
def test_out_of_range_ids_raise(rng, model, bad_id):
  tokens = np.array(random_tokens(rng, (2, 6)))
  tokens[1, 3] = bad_id
  bounds = rf"-1, \d+" if bad_id < 0 else rf"\d+, {bad_id}"
  message = rf"token ids must lie in \[0, 256\) for vocab_size=256; got ids in \[{bounds}\]"
  for call in (lambda: model(jnp.asarray(tokens)), lambda: model.prefill(jnp.asarray(tokens)),
               lambda: model.decode_step(jnp.asarray(tokens[:, 3]), model.init_cache(2, 8))):
    with pytest.raises(ValueError, match=message):
      call()


@pytest.mark.parametrize("bad_id", [256, -3])
def test_out_of_range_ids_give_nan_under_jit(rng, model, bad_id):
  tokens = random_tokens(rng, (2, 6)).at[0, 2].set(bad_id)
  logits = np.asarray(forward(model, tokens))
  assert np.all(np.isnan(logits[0, 2:]))           # (NaN may also reach earlier positions)
  assert np.all(np.isfinite(logits[1]))            # other sequences are unaffected


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bool_])
def test_non_integer_tokens_raise(model, dtype):
  with pytest.raises(ValueError, match="tokens must be an integer array"):
    model(jnp.zeros((1, 4), dtype))


def test_python_lists_are_rejected(model):
  with pytest.raises(ValueError, match="integer array"):
    model([[1, 2, 3]])


def test_wrong_rank_raises(model):
  with pytest.raises(ValueError, match=r"rank 2 \[B, T\]"):
    model(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match=r"rank 1 \[B\]"):
    model.decode_step(jnp.zeros((1, 1), jnp.int32), model.init_cache(1, 4))


def test_numpy_and_int64_tokens_are_accepted(rng, model):
  tokens = np.asarray(rng.integers(0, 256, (1, 5)), np.int64)
  assert model(tokens).shape == (1, 5, 256)

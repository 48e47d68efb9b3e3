"""Attention: RoPE properties and a float64 numpy reference (causal softmax, GQA, qk-norm)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlax.layers import Attention, apply_rope
from layer_helpers import D_MODEL, make_mixer, params, rel_err, rms_norm


def _np_rope(x, positions, theta):
  half = x.shape[-1] // 2
  angles = positions[:, None] * theta ** (-np.arange(half) / half)          # [T, hd/2]
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_reference(p, x, *, heads, kv_heads, head_dim, theta, qk_norm):
  b, t, _ = x.shape
  q = (x @ p["q_proj.kernel"]).reshape(b, t, heads, head_dim)
  k = (x @ p["k_proj.kernel"]).reshape(b, t, kv_heads, head_dim)
  v = (x @ p["v_proj.kernel"]).reshape(b, t, kv_heads, head_dim)
  if qk_norm:
    q, k = rms_norm(q, p["q_norm.weight"]), rms_norm(k, p["k_norm.weight"])
  positions = np.arange(t, dtype=np.float64)
  q, k = _np_rope(q, positions, theta), _np_rope(k, positions, theta)
  out = np.zeros((b, t, heads, head_dim))
  mask = np.tril(np.ones((t, t), dtype=bool))
  for h in range(heads):
    kv = h // (heads // kv_heads)
    scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kv]) / np.sqrt(head_dim)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[:, :, h] = np.einsum("bts,bsd->btd", probs, v[:, :, kv])
  return out.reshape(b, t, -1) @ p["o_proj.kernel"]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_matches_float64_reference(rng, qk_norm):
  mixer = make_mixer("attention", rng, dtype=jnp.float64, qk_norm=qk_norm)
  if qk_norm:
    mixer.q_norm.weight[...] = jnp.asarray(rng.normal(size=8), jnp.float64)
    mixer.k_norm.weight[...] = jnp.asarray(rng.normal(size=8), jnp.float64)
  x = rng.normal(size=(2, 11, D_MODEL))
  y, cache = mixer(jnp.asarray(x, jnp.float64))
  ref = attention_reference(params(mixer), x, heads=4, kv_heads=2, head_dim=8, theta=1e4,
                            qk_norm=qk_norm)
  assert rel_err(y, ref) <= 1e-10
  assert cache.k.shape == cache.v.shape == (2, 11, 2, 8)


def test_rope_scores_depend_only_on_relative_position(rng):
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float64)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float64)
  score = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([m], jnp.int32), theta=1e4)
                                     * apply_rope(k, jnp.array([n], jnp.int32), theta=1e4)))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-10)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-12)
  np.testing.assert_allclose(apply_rope(q, jnp.array([5], jnp.int32), theta=1e4),
                             _np_rope(np.asarray(q), np.array([5.0]), 1e4), rtol=1e-12)


def test_rejects_bad_head_layout():
  with pytest.raises(ValueError, match="num_kv_heads"):
    Attention(32, num_heads=4, num_kv_heads=3, head_dim=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="even head_dim"):
    Attention(32, num_heads=4, num_kv_heads=2, head_dim=7, rngs=nnx.Rngs(0))


def test_per_row_positions_decode_like_separate_rows(rng):
  """`pos` of shape [B]: each row writes its cache at its own position and attends up to it, as if
  the rows were decoded separately (rows start from prompts of different lengths)."""
  mixer = make_mixer("attention", rng, dtype=jnp.float64, qk_norm=True)
  lengths, steps, t_max = (3, 7), 4, 16
  x = jnp.asarray(rng.normal(size=(2, max(lengths) + steps, D_MODEL)), jnp.float64)
  cache = mixer.init_cache(2, t_max, jnp.float64)
  for row, n in enumerate(lengths):                       # per-row prompts, written row by row
    _, row_cache = mixer(x[row:row + 1, :n])
    cache = cache._replace(k=cache.k.at[row, :n].set(row_cache.k[0]),
                           v=cache.v.at[row, :n].set(row_cache.v[0]))
  pos = jnp.asarray(lengths, jnp.int32)
  for step in range(steps):
    tokens = jnp.stack([x[row, n + step] for row, n in enumerate(lengths)])[:, None]
    y, cache = mixer(tokens, cache=cache, pos=pos + step)
    for row, n in enumerate(lengths):
      expected, _ = mixer(x[row:row + 1, :n + step + 1])  # full causal pass of that row alone
      assert rel_err(y[row, 0], expected[0, -1]) <= 1e-10


def _implementation_pair(rng, implementation, dtype):
  """The same weights as the einsum path and as `jax.nn.dot_product_attention`."""
  seed = int(rng.integers(1 << 30))
  make = lambda impl: Attention(D_MODEL, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                                implementation=impl, dtype=dtype, param_dtype=dtype,
                                rngs=nnx.Rngs(seed))
  return make(None), make(implementation)


@pytest.mark.parametrize("implementation, dtype, tol", [("xla", jnp.float32, 1e-5)])
def test_dot_product_attention_implementation(rng, implementation, dtype, tol):
  """`implementation` routes to `jax.nn.dot_product_attention` with prefix key lengths; the valid
  rows equal the einsum path."""
  einsum, fused = _implementation_pair(rng, implementation, dtype)
  x = jnp.asarray(rng.normal(size=(3, 37, D_MODEL)), dtype)
  lengths = np.array([37, 20, 1])
  kv_mask = jnp.asarray(np.arange(37) < lengths[:, None])
  expected, _ = einsum(x, kv_mask=kv_mask)
  actual, _ = fused(x, kv_mask=kv_mask)
  for row, n in enumerate(lengths):
    assert rel_err(actual[row, :n], expected[row, :n]) <= tol


@pytest.mark.gpu
def test_cudnn_attention_matches_einsum_in_bf16(rng):
  test_dot_product_attention_implementation(rng, "cudnn", jnp.bfloat16, 1e-2)

"""Information scores of DLA (spec dla.md §4.2, §6.1–6.2).

`N(X) = X / sqrt(mean(X²) + eps_r)` is a parameter-free RMS map over a whole `[Dk, Dv]` state, and

    I = ‖N(X) − N(Y)‖_F / (‖N(Y)‖_F + eps)

with Y the reference state and X the new one. `score_from_norms` evaluates it from the three
scalars a = ‖X‖², b = ‖Y‖², x = ⟨X, Y⟩; `score_from_states` is the literal matrix formula.
"""

from __future__ import annotations

import jax.numpy as jnp


def score_from_norms(a, b, x, *, size: int, eps: float, eps_r: float):
  """Scalar form (§6.1). a = ‖X‖², b = ‖Y‖², x = ⟨X,Y⟩; `size` = Dk·Dv. Broadcasts."""
  rho_x = a / size + eps_r
  rho_y = b / size + eps_r
  d2 = a / rho_x + b / rho_y - 2.0 * x / jnp.sqrt(rho_x * rho_y)
  return jnp.sqrt(jnp.maximum(d2, 0.0)) / (jnp.sqrt(b / rho_y) + eps)


def _frobenius_norm(x):
  """`‖x‖_F` over the last two axes, with a zero (not NaN) gradient at x = 0."""
  sq = jnp.sum(x * x, axis=(-2, -1))
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def score_from_states(new, ref, *, eps: float, eps_r: float):
  """Matrix form (§4.2). new, ref `[..., Dk, Dv]` -> `[...]`."""

  def rms_map(s):
    return s / jnp.sqrt(jnp.mean(s * s, axis=(-2, -1), keepdims=True) + eps_r)

  return _frobenius_norm(rms_map(new) - rms_map(ref)) / (_frobenius_norm(rms_map(ref)) + eps)


def open_slot_norms(open_sq, u_sq, u_dot_v, k_sq, v_sq, alpha, beta=None):
  """Open-slot quantities (§6.2) -> (‖R‖², ⟨R, c⟩, ‖c‖²), R = A_t(S_open), c = w_t.

  All arguments broadcast. `u = S_openᵀ k` is the open state's key response *before* the
  transition; open_sq = ‖S_open‖² likewise. alpha = exp(g). beta = None selects Mamba-2
  (A = α·, w = k vᵀ; u_sq is unused), else the gated delta rule (A = α(I − β k kᵀ), w = β k vᵀ).
  """
  if beta is None:
    return alpha * alpha * open_sq, alpha * u_dot_v, k_sq * v_sq
  r_sq = alpha * alpha * (open_sq - (2.0 * beta - beta * beta * k_sq) * u_sq)
  r_dot_c = alpha * beta * (1.0 - beta * k_sq) * u_dot_v
  return r_sq, r_dot_c, beta * beta * k_sq * v_sq


def open_slot_score(r_sq, r_dot_c, c_sq, *, size: int, eps: float, eps_r: float):
  """I(R + c, R) from ‖R‖², ⟨R,c⟩, ‖c‖²."""
  a = r_sq + 2.0 * r_dot_c + c_sq
  return score_from_norms(a, r_sq, r_sq + r_dot_c, size=size, eps=eps, eps_r=eps_r)

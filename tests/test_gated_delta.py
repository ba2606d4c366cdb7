"""Gated delta rule: both modes against an independent float64 numpy recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.ops.gated_delta import gated_delta_rule, gated_delta_step


def reference(q, k, v, alpha, beta, S0):
  """S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = S_t q_t, in float64,
  with the [K, K] matrices written out: deliberately nothing like the code under test."""
  q, k, v, alpha, beta, S0 = (np.asarray(x, np.float64) for x in (q, k, v, alpha, beta, S0))
  B, T, H, K = q.shape
  o = np.zeros(v.shape)
  S = S0.copy()
  for b in range(B):
    for h in range(H):
      for t in range(T):
        kt = k[b, t, h][:, None]
        S[b, h] = (alpha[b, t, h] * S[b, h] @ (np.eye(K) - beta[b, t, h] * kt @ kt.T)
                   + beta[b, t, h] * v[b, t, h][:, None] @ kt.T)
        o[b, t, h] = S[b, h] @ q[b, t, h]
  return o, S


def inputs(B, T, H, K, V, seed=0, alpha_min=0.05):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(rng.normal(size=(B, T, H, K)))
  k = unit(rng.normal(size=(B, T, H, K)))
  v = rng.normal(size=(B, T, H, V))
  alpha = rng.uniform(alpha_min, 1.0, size=(B, T, H))
  beta = rng.uniform(0.0, 1.0, size=(B, T, H))
  S0 = rng.normal(size=(B, H, V, K))
  return tuple(np.float32(x) for x in (q, k, v, alpha, beta, S0))


def run(mode, chunk, q, k, v, alpha, beta, S0=None):
  f = jax.jit(lambda *a, S0: gated_delta_rule(*a, initial_state=S0, mode=mode, chunk_size=chunk))
  return f(q, k, v, alpha, beta, S0=S0)


CASES = [  # B, T, H, K, V, chunk_size, with initial state
  (2, 37, 2, 8, 6, 16, False),  # T not a multiple of the chunk, K != V
  (1, 21, 2, 8, 8, 1, True),  # chunk of one token
  (2, 130, 2, 16, 8, 64, True),  # several chunks plus a ragged tail
  (1, 45, 1, 8, 8, 20, True),  # chunk size not a power of two
]


@pytest.mark.parametrize("B,T,H,K,V,C,init", CASES)
def test_both_modes_match_reference(B, T, H, K, V, C, init):
  q, k, v, alpha, beta, S0 = inputs(B, T, H, K, V)
  S0 = S0 if init else np.zeros_like(S0)
  o_ref, S_ref = reference(q, k, v, alpha, beta, S0)
  for mode in ("recurrent", "chunk"):
    o, S = run(mode, C, q, k, v, alpha, beta, S0 if init else None)
    assert o.shape == (B, T, H, V) and o.dtype == jnp.float32
    assert S.shape == (B, H, V, K) and S.dtype == jnp.float32
    np.testing.assert_allclose(o, o_ref, atol=1e-4, rtol=1e-4, err_msg=mode)
    np.testing.assert_allclose(S, S_ref, atol=1e-4, rtol=1e-4, err_msg=mode)


def test_strong_decay_is_finite():
  # alpha down to 1e-4 over a 64-token chunk: the cumulative log decay reaches about -300,
  # so exp of the (unmasked) decay differences above the diagonal would overflow. Values
  # and gradients must stay finite and correct.
  q, k, v, alpha, beta, S0 = inputs(1, 64, 2, 8, 8, seed=3, alpha_min=1e-4)
  o_ref, S_ref = reference(q, k, v, alpha, beta, S0)
  o, S = run("chunk", 64, q, k, v, alpha, beta, S0)
  np.testing.assert_allclose(o, o_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(S, S_ref, atol=1e-4, rtol=1e-4)
  loss = lambda *a: sum(jnp.sum(x) for x in gated_delta_rule(*a[:5], initial_state=a[5]))
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, alpha, beta, S0)
  assert all(bool(jnp.isfinite(g).all()) for g in grads)


def linear_functional(seed, B, T, H, K, V):
  rng = np.random.default_rng(seed)
  wo = np.float32(rng.normal(size=(B, T, H, V)))
  wS = np.float32(rng.normal(size=(B, H, V, K)))
  return lambda o, S: jnp.sum(o * wo) + jnp.sum(S * wS), wo, wS


def test_gradients_agree():
  B, T, H, K, V, C = 2, 50, 2, 8, 6, 16
  args = inputs(B, T, H, K, V, seed=1)
  f, _, _ = linear_functional(2, B, T, H, K, V)

  def grads(mode):
    loss = lambda *a: f(*gated_delta_rule(*a[:5], initial_state=a[5], mode=mode, chunk_size=C))
    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)

  names = ("q", "k", "v", "alpha", "beta", "initial_state")
  for name, g_c, g_r in zip(names, grads("chunk"), grads("recurrent")):
    assert bool(jnp.isfinite(g_c).all()), name
    np.testing.assert_allclose(g_c, g_r, atol=2e-4, rtol=2e-4, err_msg=name)


def test_gradient_matches_reference_finite_difference():
  # A directional derivative of the float64 reference, so the gradient is checked against
  # something that shares no code with either mode.
  B, T, H, K, V = 1, 20, 1, 4, 3
  args = inputs(B, T, H, K, V, seed=4, alpha_min=0.3)
  f, wo, wS = linear_functional(5, B, T, H, K, V)
  rng = np.random.default_rng(6)
  dirs = [rng.normal(size=x.shape) * 0.5 for x in args]
  dirs[3] *= 0.1  # keep alpha and beta inside (0, 1)
  dirs[4] *= 0.1

  def ref_f(eps):
    o, S = reference(*(np.float64(x) + eps * d for x, d in zip(args, dirs)))
    return np.sum(o * wo) + np.sum(S * wS)

  eps = 1e-5
  fd = (ref_f(eps) - ref_f(-eps)) / (2 * eps)
  loss = lambda *a: f(*gated_delta_rule(*a[:5], initial_state=a[5], mode="chunk", chunk_size=8))
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)
  ad = sum(float(jnp.sum(g * d)) for g, d in zip(grads, dirs))
  np.testing.assert_allclose(ad, fd, rtol=1e-3)


def test_chunk_groups(monkeypatch):
  # The chunk mode runs a scan over groups of chunks sized by _GROUP_ELEMENTS; the small
  # shapes above fit in one group. Force two chunks per group: 7 chunks make 4 groups,
  # the last one half padding. Check values and gradients.
  from sleep_jax.ops import gated_delta as gd

  B, T, H, K, V, C = 2, 100, 2, 16, 8, 16
  monkeypatch.setattr(gd, "_GROUP_ELEMENTS", 2 * B * H * C * max(C, K, V))
  args = inputs(B, T, H, K, V, seed=9)
  o_ref, S_ref = reference(*args)
  o, S = run("chunk", C, *args)
  np.testing.assert_allclose(o, o_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(S, S_ref, atol=1e-4, rtol=1e-4)
  f, _, _ = linear_functional(10, B, T, H, K, V)

  def grads(mode):
    loss = lambda *a: f(*gated_delta_rule(*a[:5], initial_state=a[5], mode=mode, chunk_size=C))
    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)

  for g_c, g_r in zip(grads("chunk"), grads("recurrent")):
    np.testing.assert_allclose(g_c, g_r, atol=2e-4, rtol=2e-4)


def test_step_matches_one_reference_step():
  B, H, K, V = 2, 3, 8, 5
  q, k, v, alpha, beta, S0 = inputs(B, 1, H, K, V, seed=7)
  o_ref, S_ref = reference(q, k, v, alpha, beta, S0)
  o, S = jax.jit(gated_delta_step)(S0, q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], beta[:, 0])
  np.testing.assert_allclose(o, o_ref[:, 0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_compute_in_float32():
  q, k, v, alpha, beta, S0 = inputs(1, 40, 2, 8, 8, seed=8)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  o_ref, S_ref = reference(*(np.float32(bf(x)) for x in (q, k, v, alpha, beta, S0)))
  o, S = run("chunk", 16, *(bf(x) for x in (q, k, v, alpha, beta)), S0)
  assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
  np.testing.assert_allclose(np.float32(o), o_ref, atol=3e-2, rtol=2e-2)  # bf16 output rounding
  np.testing.assert_allclose(S, S_ref, atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise():
  q, k, v, alpha, beta, _ = inputs(1, 4, 1, 4, 4)
  with pytest.raises(ValueError, match="mode"):
    gated_delta_rule(q, k, v, alpha, beta, mode="parallel")
  with pytest.raises(ValueError, match="alpha"):
    gated_delta_rule(q, k, v, alpha[:, :2], beta)

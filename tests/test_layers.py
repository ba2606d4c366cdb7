"""The CPU speed paths of the shared layers are exact: `dense` (einsum with a barrier on the
cotangent) against jnp.einsum, and block-skipping attention against one unblocked softmax
over a float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax.models.attention import attend, attention_mask
from sleep_jax.models.layers import ShortConv
from sleep_jax.ops.dense import dense


@pytest.mark.parametrize("eq,x_shape,w_shape", [
    ("btd,df->btf", (2, 5, 6), (6, 7)),
    ("btd,dhk->bthk", (2, 5, 6), (6, 3, 4)),
    ("bhtk,hkd->btd", (2, 3, 5, 4), (3, 4, 6)),
])
def test_dense_matches_einsum_values_and_grads(eq, x_shape, w_shape):
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  ct = jax.random.normal(kc, jnp.einsum(eq, x, w).shape)
  loss = lambda f: lambda x, w: (f(x, w) * ct).sum() + (f(x, w) ** 2).sum()
  ours = jax.jit(jax.value_and_grad(loss(lambda x, w: dense(eq, x, w)), argnums=(0, 1)))(x, w)
  ref = jax.value_and_grad(loss(lambda x, w: jnp.einsum(eq, x, w)), argnums=(0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def numpy_attention(q, k, v, mask):
  """float64 softmax attention [B, T, H, K] x [B, S, H, K] -> [B, T, H, K]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.asarray(mask), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk->bthk", p, v)


@pytest.mark.parametrize("eviction,ctx", [("none", False), ("hard", False), ("sliding", False), ("sliding", True)])
@pytest.mark.parametrize("q_blocks", [1, 4])
def test_block_attention_matches_reference(eviction, ctx, q_blocks):
  B, T, H, K, L = 2, 16, 2, 4, 6
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(1), 3)
  S = 2 * T if ctx else T  # ctx: the previous chunk's keys come first (hybrid.chunk_attention)
  q = jax.random.normal(kq, (B, T, H, K))
  k, v = jax.random.normal(kk, (B, S, H, K)), jax.random.normal(kv, (B, S, H, K))
  q_pos = jnp.arange(S - T, S)
  mask = attention_mask(q_pos, jnp.arange(S), eviction, L)
  heads_first = lambda a: jnp.swapaxes(a, 1, 2)
  out = jax.jit(lambda q, k, v: attend(q, heads_first(k), heads_first(v), mask, q_blocks=q_blocks))(q, k, v)
  ref = numpy_attention(q, k, v, mask)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_block_attention_grads_match_unblocked():
  B, T, H, K = 2, 32, 2, 4
  q, k, v = jax.random.normal(jax.random.PRNGKey(2), (3, B, T, H, K))
  mask = attention_mask(jnp.arange(T), jnp.arange(T), "none", 1)
  hf = lambda a: jnp.swapaxes(a, 1, 2)
  grads = [jax.jit(jax.grad(lambda q, k, v, n=n: (attend(q, hf(k), hf(v), mask, q_blocks=n) ** 2).sum(),
                            argnums=(0, 1, 2)))(q, k, v) for n in (1, 4)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("eviction", ["none", "hard"])
def test_short_conv_matches_numpy_and_steps(eviction):
  W, L, B, T, D = 3, 4, 2, 10, 5
  conv = ShortConv(W, D, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
  w = np.asarray(conv.w[...])
  want = x.copy()
  for t in range(T):
    for i in range(W):
      if t - i >= 0 and (eviction == "none" or (t - i) // L == t // L):
        want[:, t] += w[i] * x[:, t - i]
  src = np.arange(T)[None, :] - np.arange(W)[:, None]  # tap i of token t reads t - i
  valid = (src >= 0) & ((src // L == np.arange(T) // L) if eviction == "hard" else True)
  got, _ = conv(jnp.asarray(x), jnp.asarray(valid))
  np.testing.assert_allclose(got, want, atol=1e-6)
  cache, steps = jnp.zeros((B, W - 1, D)), []
  for t in range(T):  # the decoder's path: one token at a time
    y, cache = conv(jnp.asarray(x[:, t:t + 1]), jnp.asarray(valid[:, t:t + 1]), cache)
    steps.append(y)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), want, atol=1e-6)

"""Wake decoding reproduces teacher-forced logits; the sampler and the transformer decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_hybrid import jit, make_model, tiny_cfg
from sleep_jax.config import Config, ModelConfig, SleepConfig
from sleep_jax.data.tasks import rule110
from sleep_jax.generate import generate, sample_logits, sample_tokens
from sleep_jax.models import model_factory
from sleep_jax.sleep import sleep_forward


def rule110_prompt(B=2, K=3, W=8, L=8):
  rng = np.random.default_rng(0)
  return np.stack([rule110.sample(rng, K=K, W=W, steps=1, chunk_len=L)["tokens"] for _ in range(B)])


@pytest.mark.parametrize("eviction,passes,attn_conv,layers", [("hard", 3, 0, []), ("sliding", 2, 0, []),
                                                              ("sliding", 2, 3, []), ("sliding", 3, 0, [1, 3])])
def test_greedy_decode_reproduces_sleep_forward(eviction, passes, attn_conv, layers):
  """Token by token with sleeps every L tokens == Algorithm 1 over the decoded sequence with
  every full chunk consolidating (logits of every position, and the greedy choices); with
  sleep.layers the decoder sleeps over that range only."""
  cfg = tiny_cfg(eviction, passes=passes, layers=layers)
  cfg.model.attn_conv = attn_conv  # a short conv before attention, its own decode cache
  if layers:
    cfg.model.pattern_repeats = 2  # attn gdn | attn gdn: a layer after the range too
  model = make_model(cfg)
  tokens = rule110_prompt()  # T = 3*8 + 1 + 3 = 28
  prompt, steps = jnp.asarray(tokens[:, :20]), 10
  graphdef, state = nnx.split(model)
  out, logits = jit(lambda st, p: sample_tokens(graphdef, st, p, jax.random.key(0), cfg, steps=steps,
                                                return_logits=True))(state, prompt)
  assert out.shape == (2, 30) and logits.shape == (2, 29, 8)
  np.testing.assert_array_equal(out[:, :20], prompt)
  inputs = out[:, :-1]
  want = jit(lambda x: sleep_forward(model, x, jnp.zeros(x.shape, jnp.int32), cfg))(inputs)
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(out[:, 20:], jnp.argmax(want[:, 19:], -1))
  # Decoding with N = 1 would give different logits after the first sleep: the sleeps are real.
  assert np.abs(np.asarray(logits[:, 8:]) - np.asarray(jit(lambda x: sleep_forward(
      model, x, jnp.ones(x.shape, jnp.int32), cfg))(inputs))[:, 8:]).max() > 1e-3


@pytest.mark.parametrize("eviction,attn_conv", [("sliding", 0), ("hard", 3), ("none", 4)])
def test_transformer_decode_matches_forward(eviction, attn_conv):
  cfg = Config(model=ModelConfig(kind="transformer", vocab_size=8, d_model=32, n_heads=2, head_dim=16, d_ff=64,
                                 n_layers=2, eviction=eviction, init_std=0.2, attn_conv=attn_conv),
               sleep=SleepConfig(chunk_len=6))
  model = model_factory(cfg)(nnx.Rngs(0))
  prompt = jnp.asarray(rule110_prompt(K=2, W=6, L=6))[:, :10]
  out, logits = generate(model, prompt, cfg, steps=6, return_logits=True)
  want = jit(lambda x: model(x)[0])(out[:, :-1])
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(out[:, 10:], jnp.argmax(want[:, 9:], -1))


def test_sample_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  key = jax.random.key(0)
  f = jit(lambda l, k: [sample_logits(l, k), sample_logits(l, k, temperature=1.0, top_k=1),
                        sample_logits(l, k, temperature=1.0, top_p=0.4),
                        sample_logits(l, k, temperature=1.0, top_k=2),
                        sample_logits(l, k, temperature=1.0, top_p=0.85),
                        sample_logits(l, k, temperature=1.0)])
  greedy, top1, nucleus1, top2, nucleus3, free = (np.asarray(x) for x in f(logits, key))
  assert (greedy == 0).all() and (top1 == 0).all() and (nucleus1 == 0).all()
  assert set(top2) == {0, 1} and abs((top2 == 0).mean() - 0.625) < 0.04  # 0.5 / 0.8
  assert set(nucleus3) == {0, 1, 2}
  np.testing.assert_allclose(np.bincount(free, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)

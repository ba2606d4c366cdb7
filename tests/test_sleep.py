"""Algorithm 1 (`sleep_forward`): passes, state-only coupling, causality, truncation, adaptivity."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from test_hybrid import jit, make_model, pure_params, reference_logits, rule110_like, tiny_cfg
from sleep_jax.sleep import get_S, put_S, sleep_forward


def zero_state(model, B):
  return get_S(model.init_state(B, max_len=0, decode=False)["layers"])


def run_pass(model, h, S, c0):
  """One pass of the whole stack over one chunk starting at stream index c0, from S alone
  (hard eviction: nothing else crosses a chunk). Returns (h, S)."""
  B, L = h.shape[:2]
  st = model.init_state(B, max_len=0, decode=False)
  st = {**st, "t": jnp.asarray(c0, jnp.int32)}
  h, layers = model.run_layers(h, put_S(st["layers"], S), model.context(L, B, None, None, st))
  return h, get_S(layers)


def jax_reference(model, cfg, tokens_BT, mask_BT, stop_before_pass=None):
  """Algorithm 1 as python loops over `run_pass` (hard eviction, batch-uniform chunks),
  differentiable; optionally stop_gradient on the carry entering pass `stop_before_pass`."""
  L, N = cfg.sleep.chunk_len, cfg.sleep.passes
  B, T = tokens_BT.shape
  S, logits = zero_state(model, B), []
  for c0 in range(0, T, L):
    h, S = run_pass(model, model.embed_tokens(tokens_BT[:, c0:c0 + L]), S, c0)
    logits.append(model.head(h))
    if np.all(np.asarray(mask_BT)[:, c0:c0 + L] == 0):
      for n in range(2, N + 1):
        if n == stop_before_pass:
          h, S = jax.lax.stop_gradient((h, S))
        h, S = run_pass(model, h, S, c0)
  return jnp.concatenate(logits, 1)


def test_passes_run_and_match_reference():
  tokens, mask = rule110_like(T=28)
  out = {}
  for eviction, N in (("hard", 3), ("sliding", 2)):
    cfg = tiny_cfg(eviction, passes=N)
    model = make_model(cfg)
    got = jit(lambda t, m: sleep_forward(model, t, m, cfg))(tokens, mask)
    np.testing.assert_allclose(got, reference_logits(pure_params(model), cfg, tokens, mask), rtol=1e-4, atol=1e-4)
    out[eviction] = got
  cfg1 = tiny_cfg("hard", passes=1)
  one = reference_logits(pure_params(make_model(cfg1)), cfg1, tokens, mask)
  # Sleeping changes what the later chunks see, never the first chunk (pass 1 from S = 0).
  np.testing.assert_allclose(one[:, :8], out["hard"][:, :8], atol=1e-6)
  assert np.abs(one[:, 8:] - out["hard"][:, 8:]).max() > 1e-2


def test_sleep_schedule_is_data():
  """every_chunk sleeps on chunks that have targets (text); an explicit per-example schedule
  (the batch's "consolidate") overrides the rule; both equal the reference."""
  tokens, _ = rule110_like(B=3, T=28)
  ones = jnp.ones_like(tokens)  # text: every position is a target
  for eviction in ("hard", "sliding"):
    cfg = tiny_cfg(eviction, passes=3)
    cfg.sleep.schedule = "every_chunk"
    model = make_model(cfg)
    got = jit(lambda t, m: sleep_forward(model, t, m, cfg))(tokens, ones)
    np.testing.assert_allclose(got, reference_logits(pure_params(model), cfg, tokens, ones), rtol=1e-4, atol=1e-4)
    cfg.sleep.schedule = "masked"  # the masked rule never sleeps on text: N passes change nothing
    plain = jit(lambda t, m: sleep_forward(model, t, m, cfg))(tokens, ones)
    assert np.abs(np.asarray(got) - np.asarray(plain))[:, 8:].max() > 1e-3
    given = np.array([[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], bool)
    got = jit(lambda t, m, c: sleep_forward(model, t, m, cfg, consolidate_BC=c))(tokens, ones, given)
    np.testing.assert_allclose(got, reference_logits(pure_params(model), cfg, tokens, ones, given),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got)[2], np.asarray(plain)[2], atol=1e-6)  # never sleeps = N=1


def test_consolidation_reaches_later_chunks_only_through_S():
  """Chunk 1's logits must equal a fresh pass over chunk 1 from the state S that chunk 0 left
  (no features, KV cache or conv history crossing the boundary), whatever chunk 0 holds."""
  cfg = tiny_cfg("hard", passes=3)
  model = make_model(cfg)
  L = 8
  tokens, mask = rule110_like(T=16)
  mask = mask.at[:, 8:].set(1)  # chunk 0 consolidates, chunk 1 predicts
  fwd = jit(lambda t: sleep_forward(model, t, mask, cfg))

  @jit
  def from_state(t):
    h, S = model.embed_tokens(t[:, :L]), zero_state(model, t.shape[0])
    for _ in range(3):
      h, S = run_pass(model, h, S, 0)
    h1, _ = run_pass(model, model.embed_tokens(t[:, L:]), S, L)
    return model.head(h1)

  other = tokens.at[:, :L].set(3 - tokens[:, :L])  # flip every bit of chunk 0
  for t in (tokens, other):
    np.testing.assert_allclose(fwd(t)[:, L:], from_state(t), atol=1e-5)
  assert np.abs(fwd(tokens)[:, L:] - fwd(other)[:, L:]).max() > 1e-3  # chunk 0 does matter


def test_causality_by_gradients():
  """d logits_t / d embedding_s = 0 for s > t (every token id is used at one position)."""
  cfg = tiny_cfg("sliding", passes=2, L=6)
  cfg.model.vocab_size = T = 18
  model = make_model(cfg)
  tokens = jnp.arange(T, dtype=jnp.int32)[None]
  mask = jnp.zeros((1, T), jnp.int32).at[:, 12:].set(1)
  graphdef, state = nnx.split(model)
  probe = jax.random.normal(jax.random.key(0), (T, T))

  def logits_t(embed):
    st = jax.tree.map(lambda x: x, state)  # a copy whose embedding is the argument
    st["embed"] = nnx.Param(embed)
    m = nnx.merge(graphdef, st)
    return jnp.einsum("tv,tv->t", sleep_forward(m, tokens, mask, cfg)[0], probe)

  jac_TSD = jit(jax.jacrev(logits_t))(model.embed[...])
  dep = np.abs(np.asarray(jac_TSD)).sum(-1)  # [t, s]
  t, s = np.indices(dep.shape)
  assert dep[s > t].max() == 0.0
  assert dep[s <= t].min() > 0.0  # every earlier token matters (across chunks via S and the window)


def test_truncated_gradients():
  cfg = tiny_cfg("hard", passes=3, pattern=["gdn"])  # attention plays no part in truncation
  model = make_model(cfg)
  tokens, mask = rule110_like(T=16)
  mask = mask.at[:, 8:].set(1)  # chunk 0 sleeps, chunk 1 is scored
  graphdef, state = nnx.split(model)

  def loss(forward):
    return lambda st: jnp.sum(jnp.square(forward(nnx.merge(graphdef, st))[:, 8:]))

  def sleep_with(K):
    cfg_k = tiny_cfg("hard", passes=3, pattern=["gdn"], truncate_passes=K)
    return loss(lambda m: sleep_forward(m, tokens, mask, cfg_k))

  # K = N is the full gradient: truncate_passes = 0 (no truncation) must trace to the very
  # program K = N runs (compared as jaxprs, which costs no compile).
  jaxpr = lambda f: str(jax.make_jaxpr(jax.grad(f))(state))
  assert jaxpr(sleep_with(0)) == jaxpr(sleep_with(3))
  grads = [jit(jax.grad(f))(state) for f in (
      sleep_with(3), sleep_with(1), loss(lambda m: jax_reference(m, cfg, tokens, mask, stop_before_pass=3)))]
  k3, k1, ref_k1 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in grads)
  np.testing.assert_allclose(k1, ref_k1, rtol=1e-3, atol=1e-6)  # the stop sits before pass N-K+1
  assert np.abs(k1 - k3).max() > 1e-3 * np.abs(k3).max()


def test_consolidation_is_per_example():
  cfg = tiny_cfg("hard", passes=3)
  model = make_model(cfg)
  tokens, mask = rule110_like(T=20)
  mask = mask.at[1, 3].set(1)  # example 1: chunk 0 is a prediction chunk, example 0 sleeps on it
  fwd = jit(lambda t, m: sleep_forward(model, t, m, cfg, return_passes=True))
  both, n_both = fwd(tokens, mask)
  for b in range(2):
    alone, n_alone = fwd(tokens[b:b + 1], mask[b:b + 1])
    np.testing.assert_allclose(both[b:b + 1], alone, atol=1e-6)
    np.testing.assert_array_equal(n_both[b:b + 1], n_alone)
  np.testing.assert_array_equal(n_both, [[3, 3, 1], [1, 3, 1]])


def test_adaptive_depth():
  tokens, mask = rule110_like(T=20)
  run = lambda cfg, **kw: jit(lambda t, m: sleep_forward(make_model(cfg), t, m, cfg, return_passes=True,
                                                             **kw))(tokens, mask)
  fixed2, _ = run(tiny_cfg("hard", passes=2))
  fixed4, _ = run(tiny_cfg("hard", passes=4, adaptive_tol=1e9), adaptive=False)  # tol ignored
  loose, n_loose = run(tiny_cfg("hard", passes=4, adaptive_tol=1e9))  # stops at the first check
  tight, n_tight = run(tiny_cfg("hard", passes=4, adaptive_tol=1e-12))  # never converges
  np.testing.assert_allclose(loose, fixed2, atol=1e-6)
  np.testing.assert_allclose(tight, fixed4, atol=1e-6)
  np.testing.assert_array_equal(n_loose, [[2, 2, 1]] * 2)
  np.testing.assert_array_equal(n_tight, [[4, 4, 1]] * 2)
  assert np.abs(fixed4 - fixed2).max() > 1e-3


def test_single_pass_without_remat_matches_reference_and_remat_path():
  """N = 1 with model.remat=false takes the direct path (no pass scan, no per-pass remat):
  same logits as the reference and the same gradients as the rematerialised scan."""
  import dataclasses

  tokens, mask = rule110_like(T=28)
  grads = {}
  for eviction in ("hard", "sliding"):
    for remat in (True, False):
      cfg = tiny_cfg(eviction, passes=1)
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
      model = make_model(cfg)
      graphdef, state = nnx.split(model)
      f = lambda st, t, m, cfg=cfg, graphdef=graphdef: sleep_forward(nnx.merge(graphdef, st), t, m, cfg)
      got = jit(f)(state, tokens, mask)
      np.testing.assert_allclose(got, reference_logits(pure_params(model), cfg, tokens, mask), rtol=1e-4, atol=1e-4)
      grads[remat] = jit(jax.grad(lambda st, t, m: (f(st, t, m) ** 2).mean()))(state, tokens, mask)
    for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

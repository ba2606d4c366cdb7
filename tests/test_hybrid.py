"""The decoder (hybrid configurations) and the GDN block against an independent float64
numpy reference.

`reference_logits` below re-implements the hybrid (RMSNorm, RoPE attention with hard or
sliding eviction, the GDN block with the explicit matrix recurrence of PAPERS.md, SwiGLU)
and Algorithm 1 (python loops over chunks, passes and tokens) from the parameter dict
alone; it shares no code with sleep_jax. test_sleep.py and test_generate.py reuse it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sleep_jax import sharding as shd
from sleep_jax.config import Config, MeshConfig, ModelConfig, SleepConfig
from sleep_jax.models import model_factory
from sleep_jax.models.roles import param_roles
from sleep_jax.models.roles import param_roles
from sleep_jax.sleep import gdn_only_mask, sleep_forward


# Test programs are tiny: skip LLVM's optimisation passes, which dominate their compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def tiny_cfg(eviction="hard", passes=1, L=8, pattern=("attn", "gdn"), **sleep):
  model = ModelConfig(kind="hybrid", vocab_size=8, d_model=32, n_heads=2, head_dim=16, d_ff=64, eviction=eviction,
                      layer_pattern=list(pattern), pattern_repeats=1, gdn_conv=4, gdn_chunk=4, init_std=0.2)
  return Config(model=model, sleep=SleepConfig(passes=passes, chunk_len=L, **sleep))


def make_model(cfg, seed=0):
  return model_factory(cfg)(nnx.Rngs(seed))


def pure_params(model):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# -- the independent reference (numpy float64) ---------------------------------------------
def _rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _silu(x):
  return x / (1 + np.exp(-x))


def _rope(x_LHK, pos_L, base):
  half = x_LHK.shape[-1] // 2
  ang = pos_L[:, None] * base ** (-np.arange(half) / half)
  s, c = np.sin(ang)[:, None], np.cos(ang)[:, None]
  x1, x2 = x_LHK[..., :half], x_LHK[..., half:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _attention(p, x_LD, pos_L, prev, L, base):
  q = _rope(np.einsum("ld,dhk->lhk", x_LD, p["wq"]), pos_L, base)
  k = _rope(np.einsum("ld,dhk->lhk", x_LD, p["wk"]), pos_L, base)
  v = np.einsum("ld,dhk->lhk", x_LD, p["wv"])
  keys, vals, kpos = k, v, pos_L
  if prev is not None:  # sliding: the previous chunk's pass-1 keys/values
    keys, vals, kpos = np.concatenate([prev[0], k]), np.concatenate([prev[1], v]), np.concatenate([prev[2], pos_L])
  logits = np.einsum("thk,shk->hts", q, keys) / np.sqrt(q.shape[-1])
  ok = (kpos[None] <= pos_L[:, None]) & (pos_L[:, None] - kpos[None] < L)
  logits = np.where(ok[None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("hts,shk,hkd->td", w, vals, p["wo"]), (k, v, pos_L)


def _gdn(p, x_LD, S_HVK, q_scale=False):
  """GDN with its own key/value head counts: q/k head j // (Hv / Hk) serves value head j."""
  Lc, K = x_LD.shape[0], p["wq"].shape[-1]
  W = p["conv_q"].shape[0]

  def conv(w_name, c_name):  # conv history is zero per chunk
    a = np.einsum("ld,dhk->lhk", x_LD, p[w_name])
    padded = np.concatenate([np.zeros((W - 1,) + a.shape[1:]), a])
    return _silu(np.stack([sum(padded[t + i] * p[c_name][i] for i in range(W)) for t in range(Lc)]))

  unit = lambda a: a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)
  q, k, v = unit(conv("wq", "conv_q")), unit(conv("wk", "conv_k")), conv("wv", "conv_v")
  if q_scale:
    q = q / np.sqrt(K)
  rep = v.shape[1] // q.shape[1]
  q, k = np.repeat(q, rep, axis=1), np.repeat(k, rep, axis=1)
  dt = np.log1p(np.exp(x_LD @ p["wa"] + p["dt_bias"]))
  alpha = np.exp(np.maximum(-np.exp(p["a_log"]) * dt, -20.0))
  beta = 1 / (1 + np.exp(-(x_LD @ p["wb"])))
  o = np.zeros(v.shape)
  S = S_HVK.copy()
  for t in range(Lc):
    for h in range(S.shape[0]):
      kk = k[t, h][:, None]
      S[h] = alpha[t, h] * S[h] @ (np.eye(K) - beta[t, h] * kk @ kk.T) + beta[t, h] * v[t, h][:, None] @ kk.T
      o[t, h] = S[h] @ q[t, h]
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * p["o_norm"]["scale"]
  o = o * _silu(np.einsum("ld,dhk->lhk", x_LD, p["wg"]))
  return np.einsum("lhv,hvd->ld", o, p["wo"]), S


def _layer(params, mc, r, p_idx):
  return jax.tree.map(lambda a: a[r], params["groups"][p_idx])


def reference_pass(params, mc, L, h_LD, S, pos_L, prev_kv, lo=0, hi=None):
  """Layers [lo, hi) of one pass over one chunk of one example. S: {layer index: [H,V,K]};
  returns h, S, kv."""
  S, kv = dict(S), {}
  P = len(mc.layer_pattern)
  hi = P * mc.pattern_repeats if hi is None else hi
  for i in range(lo, hi):
    r, p_idx = divmod(i, P)
    kind = mc.layer_pattern[p_idx]
    lp = _layer(params, mc, r, p_idx)
    x = _rms(h_LD, lp["mixer_norm"]["scale"])
    if kind == "gdn":
      y, S[i] = _gdn(lp["gdn"], x, S[i])
    else:
      y, kv[i] = _attention(lp["attn"], x, pos_L, prev_kv.get(i) if prev_kv else None, L, mc.rope_base)
    h_LD = h_LD + y
    if "levels" in lp:  # model.mlp = cms: the level chain, each SwiGLU + gated low-rank experts
      for lv in _items(lp["levels"]):
        xm = _rms(h_LD, lv["norm"]["scale"])
        out = _swiglu(lv["mlp"], xm)
        for e in _items(lv["experts"]):  # every expert, gated by active * sigmoid(router) (top_k = 0)
          g = e["active"] / (1 + np.exp(-(xm @ e["gate"] + e["bias"])))
          out = out + g[:, None] * (_silu(xm @ e["a"]) @ e["b"])
        h_LD = h_LD + out
    else:
      h_LD = h_LD + _swiglu(lp["mlp"], _rms(h_LD, lp["mlp_norm"]["scale"]))
  return h_LD, S, kv


def _items(xs):  # an nnx.List's pure dict: {0: .., 1: ..}
  return [xs[k] for k in sorted(xs)] if isinstance(xs, dict) else list(xs)


def _swiglu(m, x):
  return (_silu(x @ m["w_gate"]) * (x @ m["w_up"])) @ m["w_down"]


def reference_logits(params, cfg, tokens_BT, mask_BT, consolidate_BC=None):
  """Algorithm 1, example by example, chunk by chunk, pass by pass. With sleep.layers =
  [lo, hi) the extra passes loop those layers only; the layers after them run once more,
  from the S they had before the chunk, on the last pass's features. A chunk consolidates
  as consolidate_BC says, else as sleep.schedule does (masked: all targets masked)."""
  mc, L, N = cfg.model, cfg.sleep.chunk_len, cfg.sleep.passes
  n = len(mc.layer_pattern) * mc.pattern_repeats
  lo, hi = cfg.sleep.layers or (0, n)
  tokens_BT, mask_BT = np.asarray(tokens_BT), np.asarray(mask_BT)
  out = []
  for b in range(tokens_BT.shape[0]):
    S = {i: np.zeros((mc.n_heads, mc.head_dim, mc.head_dim)) for i in range(n)
         if mc.layer_pattern[i % len(mc.layer_pattern)] == "gdn"}
    prev, logits = None, []
    for c0 in range(0, tokens_BT.shape[1], L):
      tok, pos = tokens_BT[b, c0:c0 + L], np.arange(c0, min(c0 + L, tokens_BT.shape[1]))
      h_lo, S_next, kv = reference_pass(params, mc, L, params["embed"][tok], S, pos, prev, 0, lo)
      h_mid, S_next, kv2 = reference_pass(params, mc, L, h_lo, S_next, pos, prev, lo, hi)
      h, S_next, kv3 = reference_pass(params, mc, L, h_mid, S_next, pos, prev, hi, n)
      kv = {**kv, **kv2, **kv3}
      x = _rms(h, params["final_norm"]["scale"])
      logits.append(x @ params["unembed"])
      if consolidate_BC is not None:
        sleeps = bool(consolidate_BC[b][c0 // L])
      else:
        sleeps = cfg.sleep.schedule == "every_chunk" or np.all(mask_BT[b, c0:c0 + L] == 0)
      if sleeps and N > 1:
        for _ in range(N - 1):
          h_mid, S_next, _ = reference_pass(params, mc, L, h_mid, S_next, pos, prev, lo, hi)
        post_in = {**S_next, **{i: s for i, s in S.items() if i >= hi}}  # the chunk's incoming S
        _, S_post, _ = reference_pass(params, mc, L, h_mid, post_in, pos, prev, hi, n)
        S_next = {**S_next, **{i: s for i, s in S_post.items() if i >= hi}}
      S, prev = S_next, (kv if mc.eviction == "sliding" else None)
    out.append(np.concatenate(logits))
  return np.stack(out)


def rule110_like(B=2, T=28, L=8, seed=0):
  """Bits in consolidation chunks, then a query chunk whose targets are answers."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 3, size=(B, T)).astype(np.int32)
  mask = np.zeros((B, T), np.int32)
  mask[:, (T // L) * L:] = 1
  return jnp.asarray(tokens), jnp.asarray(mask)


# -- tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_n1_equals_plain_hybrid_reference(eviction):
  cfg = tiny_cfg(eviction, passes=1)
  model = make_model(cfg)
  tokens, mask = rule110_like(T=28)
  got = jit(lambda t, m: sleep_forward(model, t, m, cfg))(tokens, mask)
  want = reference_logits(pure_params(model), cfg, tokens, mask)
  assert got.shape == (2, 28, 8) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(want).max() > 0.1  # not vacuous


def test_gdn_block_step_equals_chunk():
  cfg = tiny_cfg()
  graphdef, state = nnx.split(make_model(cfg).groups[1])
  gdn = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).gdn
  x = jax.random.normal(jax.random.key(0), (2, 11, 32))
  S0 = 0.1 * jax.random.normal(jax.random.key(1), (2, 2, 16, 16))
  taps = lambda T: jnp.arange(T)[None, :] >= jnp.arange(4)[:, None]  # no eviction: every earlier input
  y, S, _ = jit(lambda x, S: gdn(x, S, valid=taps(11)))(x, S0)

  @jit
  def stepwise(x, S0):
    def body(carry, x_BD):
      S, conv = carry
      y_B1D, S, conv = gdn(x_BD[:, None], S, valid=jnp.ones((4, 1), bool), conv_cache=conv)
      return (S, conv), y_B1D[:, 0]

    (S, _), y_TBD = jax.lax.scan(body, (S0, jnp.zeros((2, 3, 96))), jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(y_TBD, 0, 1), S

  y_step, S_step = stepwise(x, S0)
  np.testing.assert_allclose(y_step, y, atol=1e-5)
  np.testing.assert_allclose(S_step, S, atol=1e-5)


def test_stack_layout_and_gdn_only_mask():
  cfg = tiny_cfg()
  cfg.model.pattern_repeats = 3
  model = nnx.eval_shape(lambda: make_model(cfg))  # shapes only
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert params["groups"][0]["attn"]["wq"].shape == (3, 32, 2, 16)
  assert params["groups"][1]["gdn"]["wq"].shape == (3, 32, 2, 16)
  mask = gdn_only_mask(param_roles(model))
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert all(jax.tree.leaves(mask["groups"][1])) and not any(jax.tree.leaves(mask["groups"][0]))
  assert not mask["embed"] and not mask["unembed"] and not mask["final_norm"]["scale"]


def test_sharded_loss_equals_single_device():
  """Eval loss (forward only: a train-step compile of this model costs ~15 s of CPU)."""
  from sleep_jax.train import Trainer

  cfg = tiny_cfg(passes=2)
  cfg.model.vocab_size = 4
  tokens, mask = rule110_like(B=8, T=25, seed=1)
  batch = {"tokens": np.asarray(tokens) % 4, "loss_mask": np.asarray(mask)}
  losses = []
  for mesh in (shd.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1]), shd.make_mesh(MeshConfig(2, 2, 2))):
    trainer = Trainer(cfg, mesh=mesh)
    params = shd.init_params(trainer.make_model, cfg.seed, trainer.param_shardings)
    out = trainer.eval_step(params, shd.global_batch(batch, mesh))
    losses.append(float(out["loss_sum"]) / float(out["tokens"]))
    if mesh.size == 8:  # really split over the tensor and fsdp axes
      wq = params["groups"][1]["gdn"]["wq"]
      assert wq.sharding.shard_shape(wq.shape) == (1, 16, 1, 16)
  np.testing.assert_allclose(losses[1], losses[0], atol=1e-4)
  assert 0.5 < losses[0] < 5


@pytest.mark.parametrize("eviction,layers", [("hard", [1, 3]), ("sliding", [0, 2]), ("hard", [2, 5])])
def test_sleep_on_a_layer_range_matches_reference(eviction, layers):
  """sleep.layers = [lo, hi): the passes loop only those layers (paper A's Jet-Nemotron
  recipe), with boundaries inside and across pattern repeats."""
  cfg = tiny_cfg(eviction, passes=3, layers=layers)
  cfg.model.pattern_repeats = 3  # 6 layers: attn gdn attn gdn attn gdn
  model = make_model(cfg)
  tokens, mask = rule110_like(T=28)
  got = jit(lambda t, m: sleep_forward(model, t, m, cfg))(tokens, mask)
  want = reference_logits(pure_params(model), cfg, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # ... and differ from looping the whole stack: the range is really honoured.
  cfg_all = tiny_cfg(eviction, passes=3)
  cfg_all.model.pattern_repeats = 3
  assert np.abs(reference_logits(pure_params(model), cfg_all, tokens, mask) - want)[:, 8:].max() > 1e-3


def test_cms_mlp_hybrid_with_sleep_passes_matches_reference():
  """model.mlp = cms on a GDN/attention hybrid: every layer's MLP is the CMS level chain. With
  hard eviction and 3 sleep passes it equals the float64 reference, with some experts active
  (B != 0) as expansion leaves them, and with none (the plain level MLPs)."""
  cfg = tiny_cfg("hard", passes=3)
  cfg.model.mlp = "cms"
  cfg.model.cms.d_ff, cfg.model.cms.update_every, cfg.model.cms.experts, cfg.model.cms.rank = [48, 32], [1, 4], 2, 4
  model = make_model(cfg)
  assert all(len(g.levels) == 2 and not hasattr(g, "mlp") for g in model.groups)
  tokens, mask = rule110_like(T=28)
  fwd = jit(lambda m, t, k: sleep_forward(m, t, k, cfg))
  inactive = np.asarray(fwd(model, tokens, mask))
  np.testing.assert_allclose(inactive, reference_logits(pure_params(model), cfg, tokens, mask), rtol=1e-4, atol=1e-4)
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  rng = np.random.default_rng(0)
  for g in (0, 1):  # the attention group's slot 1 of level 0, the GDN group's slot 0 of level 1
    e = pure["groups"][g]["levels"][g ^ 1]["experts"][g]
    e["active"] = jnp.ones_like(e["active"])
    e["b"] = jnp.asarray(rng.normal(0, 0.3, e["b"].shape), jnp.float32)
    e["gate"] = jnp.asarray(rng.normal(0, 0.5, e["gate"].shape), jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  got = np.asarray(fwd(model, tokens, mask))
  np.testing.assert_allclose(got, reference_logits(pure_params(model), cfg, tokens, mask), rtol=1e-4, atol=1e-4)
  assert np.abs(got - inactive).max() > 1e-3  # the active experts really contribute


@pytest.mark.parametrize("layers", [[], [1, 4]])
def test_scan_over_layers_equals_unrolled(layers):
  cfg = tiny_cfg("sliding", passes=2, layers=layers)
  cfg.model.pattern_repeats = 3
  tokens, mask = rule110_like(T=28)
  out = []
  for scan in (True, False):
    cfg.model.scan_layers = scan
    model = make_model(cfg)
    out.append(jit(lambda t, m: sleep_forward(model, t, m, cfg))(tokens, mask))
  np.testing.assert_allclose(out[0], out[1], atol=1e-5)

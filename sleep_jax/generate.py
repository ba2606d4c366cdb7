"""Wake inference: token-by-token decoding with a bounded KV cache and fast weights, and a
jitted sampler shared by evaluation, knowledge seeding and dreaming.

Hybrid (Paper A). Every token gets exactly ONE pass through the stack (pass-1 semantics of
`sleep.sleep_forward`): within the current chunk the GDN states advance token by token from
the chunk's starting state, and attention sees a KV cache of the current chunk (plus, for
sliding eviction, the previous chunk inside a window of L). When the chunk is full (L
tokens), the model sleeps: passes 2..N run over the chunk from pass 1's output features and
state -- pass 1 having been computed token by token, this is exactly what `sleep_forward`
does for a consolidation chunk -- then the KV cache is cleared (hard) or kept as the
previous chunk (sliding) and the conv caches reset. Decoding cost per token is therefore
O(L), independent of the context length. At inference there is no loss mask: every full
chunk is consolidated (prediction chunks would only differ in the state they hand on).

Transformer baseline: a full KV cache of `max_len` positions (attention masked by the
model's eviction mode), O(context) per token.

Interface (what `generate` needs from a model, so other models can plug in): a decoder is a
pair `init(batch, max_len) -> cache` and `step(cache, token_B) -> (logits_BV float32,
cache)`; `decoder_for(model, cfg)` builds it for HybridLM and Transformer, or uses the
model's own `init_cache(batch, max_len, cfg)` / `decode_step(cache, token_B, cfg)` methods
if it has them (the hook for Paper B's models).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.config import Config, to_yaml
from sleep_jax.models.hybrid import decode_attend
from sleep_jax.models.layers import attention_mask
from sleep_jax.sleep import check_eviction, make_pass, run_passes

Cache = dict[str, Any]


# -- sampling ----------------------------------------------------------------------------
def sample_logits(logits_BV: jax.Array, rng: jax.Array, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """Next tokens [B] int32: greedy for temperature 0, else top-k / nucleus sampling."""
  if temperature <= 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth_B1 = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_B1, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits, axis=-1)[..., ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    n_keep_B = jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p, axis=-1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, jnp.maximum(n_keep_B, 1)[:, None] - 1, axis=-1)
    logits = jnp.where(logits < threshold_B1, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# -- hybrid decoder ------------------------------------------------------------------------
def hybrid_init_cache(model, batch: int, cfg: Config) -> Cache:
  """Empty wake state: t = 0, S = 0, zero conv caches, empty KV cache (L or 2L slots)."""
  mc, L = cfg.model, cfg.sleep.chunk_len
  sliding = check_eviction(mc.eviction)
  dtype = jnp.dtype(mc.compute_dtype)
  Lc = 2 * L if sliding else L
  kv_shape = (mc.pattern_repeats, batch, mc.n_heads, Lc, mc.head_dim)
  return {
      "t": jnp.zeros((), jnp.int32),
      "S": model.zero_state(batch),
      "conv": tuple(jnp.zeros(model.conv_cache_shape(batch), dtype) for _ in model.gdn_groups),
      "kv": tuple((jnp.zeros(kv_shape, dtype), jnp.zeros(kv_shape, dtype)) for _ in model.attn_groups),
      "attn_conv": tuple(jnp.zeros((mc.pattern_repeats, batch, mc.attn_conv - 1, mc.d_model), dtype)
                         for _ in model.attn_groups) if mc.attn_conv else (),
      "h": jnp.zeros((batch, L, mc.d_model), dtype),  # pass-1 output features of the chunk
      "passes": jnp.zeros((batch,), jnp.int32),  # extra (sleep) passes run so far, for logging
  }


def _hybrid_sleep(model, cache: Cache, cfg: Config) -> Cache:
  """The chunk just completed: passes 2..N from (h_1, S_1), then evict."""
  L = cfg.sleep.chunk_len
  sliding = check_eviction(cfg.model.eviction)
  B = cache["h"].shape[0]
  c = cache["t"] // L - 1  # index of the completed chunk
  positions_BL = jnp.broadcast_to(c * L + jnp.arange(L, dtype=jnp.int32), (B, L))
  graphdef, state = nnx.split(model)
  one_pass = make_pass(graphdef, positions_BL, c > 0, L, sliding)
  # run_pass wants [R, B, L, H, K]; the decode cache is [R, B, H, Lc, K] (see decode_attend).
  ctx = tuple((jnp.swapaxes(k[:, :, :, :L], 2, 3), jnp.swapaxes(v[:, :, :, :L], 2, 3)) for k, v in cache["kv"]) \
      if sliding else None
  S, n_B, _, _ = run_passes(lambda h, S: one_pass(state, h, S, ctx), cache["h"], cache["S"], jnp.ones((B,), bool),
                            passes=cfg.sleep.passes, start=1, tol=cfg.sleep.adaptive_tol)
  kv = cache["kv"]
  if sliding:  # the completed chunk becomes the previous one; its K/V are pass 1's
    kv = tuple((k.at[:, :, :, :L].set(k[:, :, :, L:]), v.at[:, :, :, :L].set(v[:, :, :, L:])) for k, v in kv)
  return {**cache, "S": S, "kv": kv, "conv": jax.tree.map(jnp.zeros_like, cache["conv"]),
          "passes": cache["passes"] + n_B - 1}


def hybrid_decode_step(model, cache: Cache, token_B: jax.Array, cfg: Config):
  L = cfg.sleep.chunk_len
  t = cache["t"]
  h_B1D = model.embed_tokens(token_B[:, None])
  h_B1D, S, conv, kv, aconv = model.decode_token(h_B1D, t, cache["S"], cache["conv"], cache["kv"], chunk_len=L,
                                                sliding=check_eviction(cfg.model.eviction),
                                                attn_conv=cache["attn_conv"])
  logits_BV = model.logits(h_B1D)[:, 0]
  hbuf = jax.lax.dynamic_update_slice(cache["h"], h_B1D.astype(cache["h"].dtype), (0, t % L, 0))
  cache = {**cache, "t": t + 1, "S": S, "conv": conv, "kv": kv, "h": hbuf, "attn_conv": aconv}
  cache = jax.lax.cond((t + 1) % L == 0, lambda c: _hybrid_sleep(model, c, cfg), lambda c: c, cache)
  return logits_BV, cache


# -- transformer decoder -------------------------------------------------------------------
def transformer_init_cache(model, batch: int, max_len: int, cfg: Config) -> Cache:
  mc = cfg.model
  shape = (mc.n_layers, batch, mc.n_heads, max_len, mc.head_dim)  # heads before slots: see decode_attend
  dtype = jnp.dtype(mc.compute_dtype)
  cache = {"t": jnp.zeros((), jnp.int32), "k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  if mc.attn_conv:  # the last attn_conv - 1 attention inputs of each layer
    cache["conv"] = jnp.zeros((mc.n_layers, batch, mc.attn_conv - 1, mc.d_model), dtype)
  return cache


def transformer_decode_step(model, cache: Cache, token_B: jax.Array, cfg: Config):
  """One token through the baseline with a full KV cache (its eviction mask applied)."""
  mc = cfg.model
  t, ck, cv = cache["t"], cache["k"], cache["v"]
  B = token_B.shape[0]
  dtype = jnp.dtype(mc.compute_dtype)
  h_B1D = jnp.take(model.embed[...], token_B, axis=0).astype(dtype)[:, None]
  positions_B1 = jnp.full((B, 1), t, jnp.int32)
  mask_S = attention_mask(t[None], jnp.arange(ck.shape[3]), mc.eviction, cfg.sleep.chunk_len)[0]
  graphdef, state = nnx.split(model.blocks)
  new = {"t": t + 1}
  for i in range(mc.n_layers):
    blk = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    a_B1D = blk.attn_norm(h_B1D)
    if blk.conv is not None:
      a_B1D, conv_i = blk.conv.step(a_B1D, cache["conv"][i], t, mc.eviction, cfg.sleep.chunk_len)
      new["conv"] = new.get("conv", cache["conv"]).at[i].set(conv_i.astype(cache["conv"].dtype))
    q, k, v = blk.attn.qkv(a_B1D, positions_B1)
    ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2)[None].astype(ck.dtype), (i, 0, 0, t, 0))
    cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2)[None].astype(cv.dtype), (i, 0, 0, t, 0))
    h_B1D = h_B1D + decode_attend(blk.attn, q, ck[i].astype(q.dtype), cv[i].astype(q.dtype), mask_S)
    h_B1D = blk.mlp_residual(h_B1D)
  x = model.final_norm(h_B1D)
  logits_BV = jnp.einsum("btd,dv->btv", x, model.unembed[...].astype(x.dtype)).astype(jnp.float32)[:, 0]
  return logits_BV, {**new, "k": ck, "v": cv}


# -- generic driver ------------------------------------------------------------------------
def decoder_for(model, cfg: Config) -> tuple[Callable[[int, int], Cache], Callable[[Cache, jax.Array], tuple]]:
  """(init(batch, max_len), step(cache, token_B)) for this model."""
  if hasattr(model, "init_cache") and hasattr(model, "decode_step"):
    return (lambda b, n: model.init_cache(b, n, cfg)), (lambda c, tok: model.decode_step(c, tok, cfg))
  if hasattr(model, "decode_token"):  # HybridLM: bounded cache, max_len is irrelevant
    return (lambda b, n: hybrid_init_cache(model, b, cfg)), (lambda c, tok: hybrid_decode_step(model, c, tok, cfg))
  if hasattr(model, "blocks"):
    return ((lambda b, n: transformer_init_cache(model, b, n, cfg)),
            (lambda c, tok: transformer_decode_step(model, c, tok, cfg)))
  raise TypeError(f"no decoder for {type(model).__name__}")


def sample_tokens(graphdef, state, prompt_BT: jax.Array, rng: jax.Array, cfg: Config, *, steps: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, return_logits: bool = False,
                  prompt_len_B: jax.Array | None = None):
  """Pure sampler (call under jit): prompt [B, T0] -> tokens [B, T0 + steps].

  The prompt goes through the same one-token-per-step path as the samples (a single
  `lax.scan` over T0 + steps - 1 positions), so its logits are exactly the decoding ones.
  With return_logits also returns logits [B, T0 + steps - 1, V]: entry i predicts token i+1.
  prompt_len_B: per-row prompt lengths (<= T0); row b keeps prompt_BT[b, :len] and samples
  the rest (imitation completes teacher dreams cut at different points).
  """
  model = nnx.merge(graphdef, state)
  B, T0 = prompt_BT.shape
  total = T0 + steps
  init, step = decoder_for(model, cfg)
  tokens_BT = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(prompt_BT.astype(jnp.int32))
  lens_B = jnp.full((B,), T0, jnp.int32) if prompt_len_B is None else prompt_len_B.astype(jnp.int32)

  def body(carry, i):
    cache, tokens_BT = carry
    logits_BV, cache = step(cache, tokens_BT[:, i])
    sampled_B = sample_logits(logits_BV, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k,
                              top_p=top_p)
    nxt_B = jnp.where(i + 1 < lens_B, tokens_BT[:, jnp.minimum(i + 1, total - 1)], sampled_B)
    tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, nxt_B[:, None], (0, i + 1))
    return (cache, tokens_BT), (logits_BV if return_logits else None)

  (_, tokens_BT), logits = jax.lax.scan(body, (init(B, total), tokens_BT), jnp.arange(total - 1))
  if return_logits:
    return tokens_BT, jnp.moveaxis(logits, 0, 1)
  return tokens_BT


def make_sampler(graphdef, cfg: Config, *, steps: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, return_logits: bool = False):
  """jit-compiled `fn(state, prompt_BT, rng)`; shapes are fixed, so it compiles once per
  prompt shape."""
  fn = functools.partial(sample_tokens, graphdef, cfg=cfg, steps=steps, temperature=temperature, top_k=top_k,
                         top_p=top_p, return_logits=return_logits)
  return jax.jit(lambda state, prompt_BT, rng: fn(state, prompt_BT, rng))


_SAMPLERS: dict[tuple, Callable] = {}


def generate(model: nnx.Module, prompt_BT: jax.Array, cfg: Config, *, steps: int, rng: jax.Array | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, return_logits: bool = False):
  """Convenience wrapper over `make_sampler` (compiled samplers are cached per config)."""
  graphdef, state = nnx.split(model)
  # GraphDefs holding a config dataclass are unhashable; the model class, the config and the
  # parameter tree structure and shapes identify the compiled sampler instead.
  shapes = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(state))
  key = (type(model).__qualname__, to_yaml(cfg), jax.tree.structure(state), shapes, tuple(prompt_BT.shape),
         steps, float(temperature), int(top_k), float(top_p), bool(return_logits))
  if key not in _SAMPLERS:
    _SAMPLERS[key] = make_sampler(graphdef, cfg, steps=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                                  return_logits=return_logits)
  rng = jax.random.key(0) if rng is None else rng
  return _SAMPLERS[key](state, prompt_BT, rng)

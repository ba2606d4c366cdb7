"""Wake inference: token-by-token decoding with the decoder's own state (KV caches, conv
caches and fast weights S), and a jitted sampler shared by evaluation, knowledge seeding,
dreaming and `sleep-jax generate`.

Decoding is the decoder's call at length 1. A model that sleeps (GDN layers and eviction,
`models.sleeps`) gets exactly ONE pass through the stack per token (pass-1 semantics of
`sleep.sleep_forward`): within the current chunk the GDN states advance token by token,
and attention sees a bounded KV cache (the current chunk; for sliding eviction also the
previous one inside a window of L). When the chunk is full (L tokens) the model sleeps:
passes 2..N run over the chunk (over sleep.layers) from pass 1's features and state -- pass
1 having been computed token by token, this is exactly what `sleep_forward` does for a
consolidation chunk -- and the chunk's keys become the previous chunk. Decoding cost per
token is therefore O(L), independent of the context length. At inference there is no loss
mask: every full chunk is consolidated.

Models that do not sleep (no GDN layer, or no eviction, e.g. an imported Hugging Face model)
decode with a cache of `max_len` slots per full-attention layer (L or 2L for evicted ones).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.config import Config, to_yaml
from sleep_jax.models import sleeps
from sleep_jax.sleep import get_S, put_S, sleep_chunk, sleep_range

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


# -- the decoder, one token at a time ---------------------------------------------------------
def init_cache(model, batch: int, max_len: int, cfg: Config) -> Cache:
  """Empty wake state: the decoder's (t = 0, S = 0, empty caches), plus for a sleeping model
  the chunk's pass-1 features (the input of its sleep passes) and the S it began with."""
  cache = {"state": model.init_state(batch, max_len=max_len, decode=True), "passes": jnp.zeros((batch,), jnp.int32)}
  if sleeps(cfg):
    L, D = cfg.sleep.chunk_len, cfg.model.d_model
    cache["h"] = jnp.zeros((batch, L, D), jnp.dtype(cfg.model.compute_dtype))
    cache["S_start"] = get_S(cache["state"]["layers"])
  return cache


def _without_chunk(layers: tuple, chunk_start) -> tuple:
  """KV caches as the chunk found them: slots written since `chunk_start` emptied."""
  def drop(g):
    if "kv" not in g:
      return g
    kv = g["kv"]
    return {**g, "kv": {**kv, "idx": jnp.where(kv["idx"] >= chunk_start, -1, kv["idx"])}}

  return tuple(drop(g) for g in layers)


def _sleep(model, cache: Cache, cfg: Config, adapters=None) -> Cache:
  """The chunk just completed: passes 2..N from pass 1's features and S, then evict."""
  L = cfg.sleep.chunk_len
  st = cache["state"]
  B = cache["h"].shape[0]
  chunk_start = st["t"] - L
  incoming = {**st, "t": chunk_start, "layers": _without_chunk(st["layers"], chunk_start)}
  _, slept, n_B, _ = sleep_chunk(model, incoming, cache["h"], jnp.ones((B,), bool), cfg, tol=cfg.sleep.adaptive_tol,
                                 start=1, S_start=cache["S_start"], adapters=adapters)
  S = get_S(slept["layers"])
  return {**cache, "state": {**st, "layers": put_S(st["layers"], S)}, "S_start": S,
          "passes": cache["passes"] + n_B - 1}


def decode_step(model, cache: Cache, token_B: jax.Array, cfg: Config, adapters: dict | None = None):
  """One token -> (logits [B, V] float32, cache). adapters: unmerged low-rank adapters
  (models/adapters.py) or None."""
  st = cache["state"]
  if not sleeps(cfg):
    logits_B1V, st = model(token_B[:, None], state=st, adapters=adapters)
    return logits_B1V[:, 0], {**cache, "state": st}
  L = cfg.sleep.chunk_len
  _, hi = sleep_range(cfg, model.n_layers)
  t = st["t"]
  ctx = model.context(1, token_B.shape[0], None, None, st)
  h_B1D, layers = model.run_layers(model.embed_tokens(token_B[:, None]), st["layers"], ctx, 0, hi, adapters)
  hbuf = jax.lax.dynamic_update_slice(cache["h"], h_B1D.astype(cache["h"].dtype), (0, t % L, 0))
  h_B1D, layers = model.run_layers(h_B1D, layers, ctx, hi, model.n_layers, adapters)
  cache = {**cache, "h": hbuf, "state": {"t": t + 1, "seg": st["seg"], "layers": layers}}
  cache = jax.lax.cond((t + 1) % L == 0, lambda c: _sleep(model, c, cfg, adapters), lambda c: c, cache)
  return model.head(h_B1D)[:, 0], cache


def sample_tokens(graphdef, state, prompt_BT: jax.Array, rng: jax.Array, cfg: Config, *, steps: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, return_logits: bool = False,
                  prompt_len_B: jax.Array | None = None, adapters: dict | None = None):
  """Pure sampler (call under jit): prompt [B, T0] -> tokens [B, T0 + steps].

  The prompt goes through the same one-token-per-step path as the samples (a single
  `lax.scan` over T0 + steps - 1 positions), so its logits are exactly the decoding ones.
  With return_logits also returns logits [B, T0 + steps - 1, V]: entry i predicts token i+1.
  prompt_len_B: per-row prompt lengths (<= T0); row b keeps prompt_BT[b, :len] and samples
  the rest (imitation completes teacher dreams cut at different points).
  adapters: unmerged low-rank adapters (models/adapters.py) or None. One adapter for a whole
  sampling run is cheaper merged into the weights once (dreaming/lora.apply): unmerged, every
  decoded token pays two more small products per adapted projection; unmerged pays off
  where several adapters share one base (a vmap over adapters).
  """
  model = nnx.merge(graphdef, state)
  B, T0 = prompt_BT.shape
  total = T0 + steps
  tokens_BT = jnp.zeros((B, total), jnp.int32).at[:, :T0].set(prompt_BT.astype(jnp.int32))
  lens_B = jnp.full((B,), T0, jnp.int32) if prompt_len_B is None else prompt_len_B.astype(jnp.int32)

  def body(carry, i):
    cache, tokens_BT = carry
    logits_BV, cache = decode_step(model, cache, tokens_BT[:, i], cfg, adapters)
    sampled_B = sample_logits(logits_BV, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k,
                              top_p=top_p)
    nxt_B = jnp.where(i + 1 < lens_B, tokens_BT[:, jnp.minimum(i + 1, total - 1)], sampled_B)
    tokens_BT = jax.lax.dynamic_update_slice(tokens_BT, nxt_B[:, None], (0, i + 1))
    return (cache, tokens_BT), (logits_BV if return_logits else None)

  (_, tokens_BT), logits = jax.lax.scan(body, (init_cache(model, B, total, cfg), tokens_BT), jnp.arange(total - 1))
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

"""Paper A's hybrid LM: attention and Gated DeltaNet layers in a repeated pattern.

Layer i of the stack is `cfg.layer_pattern[i % P]` (P = len(pattern)), repeated
`cfg.pattern_repeats` = R times; every layer is a pre-norm mixer (attention or GDN) plus a
pre-norm SwiGLU MLP. Parameters are stacked per pattern position: `groups[p]` holds the R
layers of kind pattern[p] with a leading "layers" axis, and one pass over the stack is a
`lax.scan` over the R repeats of the pattern (optionally rematerialised per repeat).

The model itself never loops over chunks: `run_pass` is ONE pass of the whole stack over
ONE chunk, with the fast weights and the attention context passed in and returned as data:

  S:   tuple over GDN groups (pattern order) of S_RBHVK  [R, B, H, V, K] float32
  ctx: None (hard eviction) or tuple over attention groups of (k_RBLHK, v_RBLHK): the
       previous chunk's keys/values, already rotated at their absolute positions.

`sleep.py` (training, Algorithm 1) and `generate.py` (wake decoding, via `decode_token`)
drive it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.config import ModelConfig
from sleep_jax.models.gdn import GatedDeltaNet
from sleep_jax.models.layers import MLP, Attention, RMSNorm, attention_mask, param, short_conv
from sleep_jax.models.transformer import stacked


class HybridBlock(nnx.Module):
  """Pre-norm mixer (`attn` or `gdn` attribute, by kind) + pre-norm SwiGLU MLP."""

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
    self.kind = kind
    self.mixer_norm = RMSNorm(cfg.d_model, rngs=rngs)
    # model.attn_conv: a short conv before attention's q/k/v (layers.ShortConv). Its taps stay
    # inside the chunk whatever the eviction: only K/V, never inputs, cross a chunk boundary.
    self.conv = short_conv(cfg, rngs) if kind == "attn" else None
    if kind == "attn":
      self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.head_dim, rngs=rngs, std=cfg.init_std,
                            rope_base=cfg.rope_base)
    elif kind == "gdn":
      self.gdn = GatedDeltaNet(cfg, rngs=rngs)
    else:
      raise ValueError(f"unknown layer kind {kind!r} (expected 'attn' or 'gdn')")
    self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.mlp = MLP(cfg.d_model, cfg.d_ff, rngs=rngs, std=cfg.init_std)

  def mlp_residual(self, h):
    return h + self.mlp(self.mlp_norm(h))


def chunk_attention(attn: Attention, x_BLD, positions_BL, ctx, ctx_valid, chunk_len: int):
  """Attention over one chunk (causal), plus the previous chunk's K/V when ctx is given.

  With ctx the mask is the sliding window of `layers.attention_mask` on absolute positions
  (key j visible from query i iff i - L < j <= i), so N = 1 is exactly a sliding-window
  hybrid; ctx_valid (scalar bool) hides the context before the first chunk.
  Returns (y_BLD, (k_BLHK, v_BLHK)) -- this chunk's rotated keys/values.
  """
  q, k, v = attn.qkv(x_BLD, positions_BL)
  pos_L = positions_BL[0]
  if ctx is None:
    return attn.attend(q, k, v, pos_L[:, None] >= pos_L[None, :]), (k, v)
  ck, cv = ctx
  key_pos = jnp.concatenate([pos_L - chunk_len, pos_L])
  mask = attention_mask(pos_L, key_pos, "sliding", chunk_len)
  visible = jnp.concatenate([jnp.broadcast_to(ctx_valid, pos_L.shape), jnp.ones(pos_L.shape, bool)])
  y = attn.attend(q, jnp.concatenate([ck.astype(k.dtype), k], 1), jnp.concatenate([cv.astype(v.dtype), v], 1),
                  mask & visible[None, :])
  return y, (k, v)


def decode_attend(attn: Attention, q_B1HK, k_BHSK, v_BHSK, mask_S) -> jax.Array:
  """One query against a KV cache laid out [B, H, S, K] (what `Attention.attend` computes).

  Decode caches keep heads before slots so both products are batched mat-vecs over the
  contiguous cache: no per-step transpose of the whole cache, which would make a long
  cache's per-token cost several copies of it.
  """
  q_BHK = q_B1HK[:, 0]
  logits_BHS = jnp.einsum("bhk,bhsk->bhs", q_BHK, k_BHSK).astype(jnp.float32) * q_BHK.shape[-1] ** -0.5
  probs_BHS = jax.nn.softmax(jnp.where(mask_S, logits_BHS, -1e30), axis=-1).astype(v_BHSK.dtype)
  out_BHK = jnp.einsum("bhs,bhsk->bhk", probs_BHS, v_BHSK)
  return jnp.einsum("bhk,hkd->bd", out_BHK, attn.wo[...])[:, None]


class HybridLM(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not cfg.layer_pattern or cfg.pattern_repeats < 1:
      raise ValueError("hybrid model needs a non-empty model.layer_pattern and pattern_repeats >= 1")
    self.cfg = cfg
    self.pattern = tuple(cfg.layer_pattern)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0)
    self.groups = nnx.List([stacked(lambda r, k=kind: HybridBlock(cfg, k, rngs=r), cfg.pattern_repeats, rngs)
                            for kind in self.pattern])
    self.final_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

  # -- shapes ------------------------------------------------------------------------------
  @property
  def gdn_groups(self) -> tuple[int, ...]:
    return tuple(i for i, k in enumerate(self.pattern) if k == "gdn")

  @property
  def attn_groups(self) -> tuple[int, ...]:
    return tuple(i for i, k in enumerate(self.pattern) if k == "attn")

  def zero_state(self, batch: int) -> tuple[jax.Array, ...]:
    """S = 0 for every GDN layer: tuple of [R, B, H, V, K] float32."""
    c = self.cfg
    return tuple(jnp.zeros((c.pattern_repeats, batch, c.n_heads, c.head_dim, c.head_dim), jnp.float32)
                 for _ in self.gdn_groups)

  # -- ends of the stack ---------------------------------------------------------------------
  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    return jnp.take(self.embed[...], tokens_BT, axis=0).astype(jnp.dtype(self.cfg.compute_dtype))

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    x = self.final_norm(h_BTD)
    return jnp.einsum("btd,dv->btv", x, self.unembed[...].astype(x.dtype)).astype(jnp.float32)

  # -- one pass over one chunk -------------------------------------------------------------
  def run_pass(self, h_BLD, S, positions_BL, *, ctx=None, ctx_valid=None, chunk_len: int = 1):
    """(h, S) -> (h', S', kv): one pass of the whole stack over one chunk.

    kv is a tuple over attention groups of (k_RBLHK, v_RBLHK): this pass's keys/values,
    which the sliding-window recipe carries into the next chunk.
    """
    pattern, R = self.pattern, self.cfg.pattern_repeats
    graphdef, state = nnx.split(self.groups)
    if ctx is None:
      ctx = ()

    def body(h, xs):
      st, S_r, ctx_r = xs
      groups = nnx.merge(graphdef, st)
      S_out, kv_out = [], []
      for kind, blk in zip(pattern, groups):
        x = blk.mixer_norm(h)
        if kind == "gdn":
          y, S_new = blk.gdn(x, S_r[len(S_out)])
          S_out.append(S_new)
        else:
          if blk.conv is not None:
            x = blk.conv(x, positions_BL, "hard", chunk_len)
          c = ctx_r[len(kv_out)] if ctx_r else None
          y, kv = chunk_attention(blk.attn, x, positions_BL, c, ctx_valid, chunk_len)
          kv_out.append(kv)
        h = blk.mlp_residual(h + y)
      return h, (tuple(S_out), tuple(kv_out))

    if self.cfg.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    xs = (state, tuple(S), tuple(ctx))
    if self.cfg.scan_layers:
      h_BLD, (S_new, kv) = jax.lax.scan(body, h_BLD, xs)
      return h_BLD, S_new, kv
    ys = []
    for r in range(R):
      h_BLD, y = body(h_BLD, jax.tree.map(lambda a: a[r], xs))
      ys.append(y)
    S_new, kv = jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else ((), ())
    return h_BLD, S_new, kv

  # -- one token (wake decoding) -----------------------------------------------------------
  def decode_token(self, h_B1D, t, S, conv, kv, *, chunk_len: int, sliding: bool, attn_conv=()):
    """One token at absolute position t through the stack (pass-1 semantics).

    S, conv: tuples over GDN groups of [R, B, H, V, K] / [R, B, W-1, H, 3K] (the conv cache
    must already be zero at a chunk's first token). kv: tuple over attention groups of
    (k, v) [R, B, H, Lc, K] with Lc = L (hard) or 2L (sliding: slots [0, L) hold the previous
    chunk, [L, 2L) the current one); this token's k, v are written at slot Lc - L + t % L.
    attn_conv: tuple over attention groups of [R, B, W-1, D], the last inputs of each
    attention layer's short conv (empty without model.attn_conv).
    Returns (h_B1D, S, conv, kv, attn_conv) with this token's entries written.
    """
    L = chunk_len
    B = h_B1D.shape[0]
    r_ = t % L
    Lc = kv[0][0].shape[3] if kv else L
    slot = Lc - L + r_
    j = jnp.arange(Lc)
    mask_S = (j >= Lc - L) & (j - (Lc - L) <= r_)
    if sliding:  # previous chunk's slot j holds position t - r_ - L + j: visible iff j > r_
      mask_S |= (j < L) & (j > r_) & (t >= L)
    positions_B1 = jnp.full((B, 1), t, jnp.int32)
    S, conv, kv, aconv = list(S), list(conv), [list(c) for c in kv], list(attn_conv)
    splits = [nnx.split(g) for g in self.groups]
    for r in range(self.cfg.pattern_repeats):
      gi = ai = 0
      for p, kind in enumerate(self.pattern):
        graphdef, state = splits[p]
        blk = nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))
        x_B1D = blk.mixer_norm(h_B1D)
        if kind == "gdn":
          y_BD, S_new, conv_new = blk.gdn.step(x_B1D[:, 0], S[gi][r], conv[gi][r])
          y_B1D = y_BD[:, None]
          S[gi] = S[gi].at[r].set(S_new)
          conv[gi] = conv[gi].at[r].set(conv_new.astype(conv[gi].dtype))
          gi += 1
        else:
          if blk.conv is not None:
            x_B1D, ac = blk.conv.step(x_B1D, aconv[ai][r], t, "hard", L)
            aconv[ai] = aconv[ai].at[r].set(ac.astype(aconv[ai].dtype))
          q, k, v = blk.attn.qkv(x_B1D, positions_B1)
          ck, cv = kv[ai]
          to_cache = lambda x: jnp.swapaxes(x, 1, 2)[None].astype(ck.dtype)  # [1, B, H, 1, K]
          ck = jax.lax.dynamic_update_slice(ck, to_cache(k), (r, 0, 0, slot, 0))
          cv = jax.lax.dynamic_update_slice(cv, to_cache(v), (r, 0, 0, slot, 0))
          kv[ai] = [ck, cv]
          y_B1D = decode_attend(blk.attn, q, ck[r].astype(q.dtype), cv[r].astype(q.dtype), mask_S)
          ai += 1
        h_B1D = blk.mlp_residual(h_B1D + y_B1D)
    return h_B1D, tuple(S), tuple(conv), tuple(tuple(c) for c in kv), tuple(aconv)

  def conv_cache_shape(self, batch: int) -> tuple[int, ...]:
    c = self.cfg
    return (c.pattern_repeats, batch, c.gdn_conv - 1, c.n_heads, 3 * c.head_dim)

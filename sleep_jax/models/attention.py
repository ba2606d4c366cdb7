"""Softmax attention over a KV cache addressed by stream index, with per-layer eviction.

Every attention call sees the keys of its own tokens plus, optionally, a cache of earlier
ones. Visibility is a pure function of stream indices (the position of a token in the
stream the model has read, not its RoPE position, which restarts at each document) and
segment ids:

  key j visible from query i  iff  0 <= idx_j <= idx_i, seg_j == seg_i, and
    none:    always                  (full causal attention)
    hard:    idx_i // L == idx_j // L  (the KV cache is cleared every L tokens)
    sliding: idx_i - idx_j < L         (the cache keeps the last L - 1 tokens)

so one call can be a whole sequence (no cache), one sleep chunk (the previous chunk in the
cache) or one decoded token, and every path computes the same function.

Cache (one per layer group, leading axis R = the group's stacked layers):
  k, v [R, B, Hkv, Sc, K]: heads before slots, so a decoded token's products are batched
  mat-vecs over the contiguous cache; idx [R, Sc] stream index of each slot (-1: empty);
  seg [R, B, Sc]. Slot of index t: t % Sc (a ring), so a cache of Sc >= L slots bounds a
  hard or sliding layer's memory however long the stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.models.adapters import project, sub
from sleep_jax.models.layers import RMSNorm, param
from sleep_jax.models.roles import NoDecay
from sleep_jax.models.rope import rope

NEG_INF = -1e30


def visible(q_idx_T, k_idx_S, eviction: str, chunk_len: int) -> jax.Array:
  """bool [T, S] from stream indices (k_idx < 0 marks an empty slot)."""
  i, j = q_idx_T[:, None], k_idx_S[None, :]
  mask = (j >= 0) & (j <= i)
  if eviction == "hard":
    mask &= (i // chunk_len) == (j // chunk_len)
  elif eviction == "sliding":
    mask &= (i - j) < chunk_len
  return mask


def attention_mask(q_pos_T, k_pos_S, eviction: str, chunk_len: int) -> jax.Array:
  """bool [T, S] for keys and queries of one stream (the single-segment case of `visible`)."""
  return visible(q_pos_T, k_pos_S, eviction, chunk_len)


def attend(q_BTHK, k_BGSK, v_BGSK, mask, q_blocks: int | None = None) -> jax.Array:
  """Softmax attention -> [B, T, H, K]. k, v head-major with G <= H key/value heads (GQA:
  query head h reads key head h // (H / G)); mask [T, S] or [B, T, S].

  mask must be causal with keys end-aligned to queries (query i sees no key past
  i + S - T), as every caller's is: queries go in q_blocks blocks, each against only the
  keys it can see, so a causal T x T attention computes (nb + 1) / 2nb of the scores (on
  the CPU, 4 blocks make attention fwd+bwd 1.7x faster at T = 512) and each block's scores
  stay cache-sized.
  """
  B, T, H, K = q_BTHK.shape
  G, S = k_BGSK.shape[1], k_BGSK.shape[2]
  nb = q_blocks or (4 if T >= 256 and T % 4 == 0 else 1)
  scale = K ** -0.5
  mask_BTS = mask if mask.ndim == 3 else mask[None]
  if G == H:  # plain multi-head: batched matmuls over (b, h) only
    q_, k_, v_, m_ = jnp.swapaxes(q_BTHK, 1, 2), k_BGSK, v_BGSK, mask_BTS[:, None]
    eq_s, eq_o, t_axis = "bhtk,bhsk->bhts", "bhts,bhsk->bhtk", 2
  else:  # grouped-query: query head h reads key head h // (H / G)
    q_ = jnp.swapaxes(q_BTHK, 1, 2).reshape(B, G, H // G, T, K)
    k_, v_, m_ = k_BGSK, v_BGSK, mask_BTS[:, None, None]
    eq_s, eq_o, t_axis = "bgrtk,bgsk->bgrts", "bgrts,bgsk->bgrtk", 3
  outs = []
  for i in range(nb):
    qs, qe = i * T // nb, (i + 1) * T // nb
    ke = qe + S - T  # the last key any query of this block may see
    q_blk = jax.lax.slice_in_dim(q_, qs, qe, axis=t_axis)
    logits = jnp.einsum(eq_s, q_blk, k_[:, :, :ke]).astype(jnp.float32) * scale
    logits = jnp.where(jax.lax.slice_in_dim(m_, qs, qe, axis=t_axis)[..., :ke], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_.dtype)
    outs.append(jnp.einsum(eq_o, probs, v_[:, :, :ke]))
  out = outs[0] if nb == 1 else jnp.concatenate(outs, axis=t_axis)
  return jnp.swapaxes(out.reshape(B, H, T, K), 1, 2)


def write_token(cache: dict, delta, r: int) -> dict:
  """A group cache (leading axis R) with layer r's decoded entry written at its ring slot."""
  k_BG1K, v_BG1K, idx_1, seg_B1 = delta
  Sc = cache["idx"].shape[1]
  if Sc == 0:
    return cache
  slot = idx_1[0] % Sc
  put = lambda buf, new, start: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype)[None], start)  # noqa: E731
  return {"k": put(cache["k"], k_BG1K, (r, 0, 0, slot, 0)), "v": put(cache["v"], v_BG1K, (r, 0, 0, slot, 0)),
          "idx": put(cache["idx"], idx_1, (r, slot)), "seg": put(cache["seg"], seg_B1, (r, 0, slot))}


def empty_cache(R: int, batch: int, kv_heads: int, slots: int, head_dim: int, dtype) -> dict:
  z = jnp.zeros((R, batch, kv_heads, slots, head_dim), dtype)
  return {"k": z, "v": z, "idx": jnp.full((R, slots), -1, jnp.int32), "seg": jnp.zeros((R, batch, slots), jnp.int32)}


def write_cache(cache: dict, k_BGTK, v_BGTK, idx_T, seg_BT) -> dict:
  """The last min(T, Sc) new entries written at their ring slots (one layer's cache)."""
  Sc, T = cache["idx"].shape[0], idx_T.shape[0]
  if Sc == 0:
    return cache
  n = min(T, Sc)
  slots = idx_T[T - n:] % Sc
  return {"k": cache["k"].at[:, :, slots].set(k_BGTK[:, :, T - n:].astype(cache["k"].dtype)),
          "v": cache["v"].at[:, :, slots].set(v_BGTK[:, :, T - n:].astype(cache["v"].dtype)),
          "idx": cache["idx"].at[slots].set(idx_T[T - n:]),
          "seg": cache["seg"].at[:, slots].set(seg_BT[:, T - n:])}


class Attention(nnx.Module):
  """Multi-head attention with the options of real models: grouped-query heads, QK-norm,
  qkv biases, a sigmoid output gate per head, partial and scaled RoPE."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
    G = cfg.n_kv_heads or H
    if H % G:
      raise ValueError(f"model.n_heads ({H}) must be a multiple of model.n_kv_heads ({G})")
    std = cfg.init_std
    self.wq = param(rngs, (D, H, K), ("embed", "heads", "kv"), std, proj="q")
    self.wk = param(rngs, (D, G, K), ("embed", "heads", "kv"), std, proj="k")
    self.wv = param(rngs, (D, G, K), ("embed", "heads", "kv"), std, proj="v")
    self.wo = param(rngs, (H, K, D), ("heads", "kv", "embed"), std / 2, proj="o", out_proj=True,
                    fan_in=("heads", "kv"))
    bias = lambda n: param(rngs, (n, K), ("heads", "kv"), 0.0, kind=NoDecay) if cfg.qkv_bias else None  # noqa: E731
    self.bq, self.bk, self.bv = bias(H), bias(G), bias(G)
    self.w_gate = param(rngs, (D, H, K), ("embed", "heads", "kv"), std, proj="out_gate") if cfg.attn_out_gate else None
    self.q_norm = RMSNorm(K, rngs=rngs, eps=cfg.norm_eps, offset=cfg.norm_offset, axis_name="kv") \
        if cfg.qk_norm else None
    self.k_norm = RMSNorm(K, rngs=rngs, eps=cfg.norm_eps, offset=cfg.norm_offset, axis_name="kv") \
        if cfg.qk_norm else None
    # Static (part of the graph definition), never a parameter or a leaf.
    self.rope_args = (int(K * cfg.rope_fraction) // 2 * 2, float(cfg.rope_base),
                      tuple(sorted((cfg.rope_scaling or {}).items())))

  def qkv(self, x_BTD, positions_BT, ad=None):
    """Rotated q [B, T, H, K], k [B, T, G, K] and v [B, T, G, K]. ad: this module's adapters
    (models/adapters.py), or None."""
    q = project("btd,dhk->bthk", x_BTD, self.wq[...], sub(ad, "wq"))
    k = project("btd,dhk->bthk", x_BTD, self.wk[...], sub(ad, "wk"))
    v = project("btd,dhk->bthk", x_BTD, self.wv[...], sub(ad, "wv"))
    if self.bq is not None:
      q, k, v = (a + b[...].astype(a.dtype) for a, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return rope(q, positions_BT, *self.rope_args), rope(k, positions_BT, *self.rope_args), v

  def output(self, o_BTHK, x_BTD, ad=None):
    if self.w_gate is not None:
      gate = project("btd,dhk->bthk", x_BTD, self.w_gate[...], sub(ad, "w_gate"))
      o_BTHK = (o_BTHK.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(o_BTHK.dtype)
    return project("bthk,hkd->btd", o_BTHK, self.wo[...], sub(ad, "wo"))

  def __call__(self, x_BTD, positions_BT, idx_T, seg_BT, cache: dict | None, *, eviction: str, chunk_len: int,
               segmented: bool, row: int | None = None, ad: dict | None = None):
    """(y [B, T, D], new cache or None). cache: this layer's slice of a group cache
    (k, v [B, G, Sc, K], idx [Sc], seg [B, Sc]), or None for attention within the call; when
    decoding (T = 1, `row` given), the whole group cache (leading axis R) and its row.
    ad: this layer's attention adapters (models/adapters.py), or None."""
    q, k, v = self.qkv(x_BTD, positions_BT, ad)
    k_BGTK, v_BGTK = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    T = x_BTD.shape[1]

    def mask_for(k_idx, k_seg):
      m = visible(idx_T, k_idx, eviction, chunk_len)
      return m[None] & (seg_BT[:, :, None] == k_seg[:, None, :]) if segmented else m

    if cache is None:
      y = attend(q, k_BGTK, v_BGTK, mask_for(idx_T, seg_BT))
      return self.output(y, x_BTD, ad), None
    if T == 1 and row is not None:
      # One decoded token, `cache` the whole stacked group cache and `row` this layer: the
      # entry is written first, in place, and attention then reads the updated row (reading
      # the old buffer before writing would make XLA copy the whole cache per token). A slot
      # is reused only once its old key can no longer be seen (the cache holds at least the
      # window).
      cache = write_token(cache, (k_BGTK, v_BGTK, idx_T, seg_BT), row)
      m = mask_for(cache["idx"][row], cache["seg"][row])
      y = attend(q, cache["k"][row].astype(q.dtype), cache["v"][row].astype(q.dtype), m)
      return self.output(y, x_BTD, ad), cache
    keys = jnp.concatenate([cache["k"].astype(k.dtype), k_BGTK], axis=2)
    vals = jnp.concatenate([cache["v"].astype(v.dtype), v_BGTK], axis=2)
    m = mask_for(jnp.concatenate([cache["idx"], idx_T]), jnp.concatenate([cache["seg"], seg_BT], axis=1))
    y = attend(q, keys, vals, m)
    return self.output(y, x_BTD, ad), write_cache(cache, k_BGTK, v_BGTK, idx_T, seg_BT)

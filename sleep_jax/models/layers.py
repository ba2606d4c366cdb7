"""Shared Flax NNX layers: norms, embeddings, SwiGLU MLP, RoPE attention with eviction masks.

Parameters carry logical axis names (`sharding_names`) that `sharding.py` maps to mesh axes.
Compute dtype is chosen by the caller (params are cast before the forward pass), so layers
never cast parameters themselves; softmax and norms run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.ops.dense import dense, materialize

nnx.use_eager_sharding(False)  # shardings are applied by jax.jit(out_shardings=...), not eagerly


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float | None) -> nnx.Param:
  """A parameter with logical axis names; std=None means ones (norm scales)."""
  if std is None:
    value = jnp.ones(shape, jnp.float32)
  elif std == 0.0:
    value = jnp.zeros(shape, jnp.float32)
  else:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
  return nnx.Param(value, out_sharding=names)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.scale = param(rngs, (dim,), ("embed",), None)
    self.eps = eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward block."""

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, std: float):
    self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
    self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
    self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), std / 2)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate_BTF = dense("btd,df->btf", x_BTD, self.w_gate[...])
    up_BTF = dense("btd,df->btf", x_BTD, self.w_up[...])
    return dense("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, self.w_down[...])


class ShortConv(nnx.Module):
  """x_t + sum_i w_i * x_{t-i}, i < W: a depthwise causal conv with a residual ("Canon" layer).

  Placed before attention's q/k/v projections it hands each position its last W - 1
  neighbours, so a single attention layer can match a multi-token key (an induction head
  needs a previous-token head below it otherwise): in-context recall is learnt in far fewer
  steps (experiments/probe_recall.py). Taps never cross a hard-eviction chunk boundary.
  `step` is the same formula for one decoded token, with the last W - 1 inputs as its cache.
  """

  def __init__(self, width: int, dim: int, *, rngs: nnx.Rngs):
    self.w = param(rngs, (width, dim), (None, "embed"), 1.0 / width)

  def _taps_valid(self, pos_T: jax.Array, eviction: str, chunk_len: int) -> jax.Array:
    """bool [W, T]: tap i at absolute position t reads a visible input."""
    i = jnp.arange(self.w.shape[0])[:, None]
    start = (pos_T // chunk_len) * chunk_len if eviction == "hard" else jnp.zeros_like(pos_T)
    return pos_T[None, :] - i >= start[None, :]

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, eviction: str, chunk_len: int) -> jax.Array:
    W, T = self.w.shape[0], x_BTD.shape[1]
    xp = jnp.pad(x_BTD, ((0, 0), (W - 1, 0), (0, 0)))
    valid_WT = self._taps_valid(positions_BT[0], eviction, chunk_len)
    w = self.w[...].astype(x_BTD.dtype)
    taps = (jnp.where(valid_WT[i][None, :, None], xp[:, W - 1 - i:W - 1 - i + T], 0) * w[i] for i in range(W))
    return x_BTD + sum(taps)

  def step(self, x_B1D: jax.Array, cache_BWD: jax.Array, t: jax.Array, eviction: str, chunk_len: int):
    """One token at position t; cache: the W - 1 inputs before it. Returns (y, new cache)."""
    W = self.w.shape[0]
    xp = jnp.concatenate([cache_BWD.astype(x_B1D.dtype), x_B1D], axis=1)  # [B, W, D]: x_{t-W+1..t}
    valid_W = self._taps_valid(t[None], eviction, chunk_len)[:, 0]
    w = self.w[...].astype(x_B1D.dtype)
    y = x_B1D + sum(jnp.where(valid_W[i], xp[:, W - 1 - i:W - i], 0) * w[i] for i in range(W))
    return y, xp[:, 1:]


def short_conv(cfg, rngs: nnx.Rngs) -> ShortConv | None:
  """The attention input's ShortConv of a ModelConfig (None when model.attn_conv is 0)."""
  return ShortConv(cfg.attn_conv, cfg.d_model, rngs=rngs) if cfg.attn_conv else None


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (half-split convention)."""
  half = x_BTHK.shape[-1] // 2
  freq_K = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTK = positions_BT[..., None].astype(jnp.float32) * freq_K
  sin, cos = materialize((jnp.sin(angle_BTK)[:, :, None, :], jnp.cos(angle_BTK)[:, :, None, :]))
  x1, x2 = x_BTHK[..., :half].astype(jnp.float32), x_BTHK[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


def attention_mask(q_pos_T: jax.Array, k_pos_S: jax.Array, eviction: str, chunk_len: int) -> jax.Array:
  """bool [T, S]: query at absolute position i may see key at position j.

  none: causal. hard: causal within the same length-L chunk (the KV cache is cleared every
  L tokens). sliding: causal over the last L tokens (the cache keeps L - 1 after eviction).
  """
  i, j = q_pos_T[:, None], k_pos_S[None, :]
  mask = j <= i
  if eviction == "hard":
    mask &= (i // chunk_len) == (j // chunk_len)
  elif eviction == "sliding":
    mask &= (i - j) < chunk_len
  return mask


class Attention(nnx.Module):
  def __init__(self, d_model: int, n_heads: int, head_dim: int, *, rngs: nnx.Rngs, std: float, rope_base: float):
    self.wq = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "kv"), std)
    self.wk = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "kv"), std)
    self.wv = param(rngs, (d_model, n_heads, head_dim), ("embed", "heads", "kv"), std)
    self.wo = param(rngs, (n_heads, head_dim, d_model), ("heads", "kv", "embed"), std / 2)
    self.rope_base = rope_base

  def qkv(self, x_BTD: jax.Array, positions_BT: jax.Array):
    q_BTHK = dense("btd,dhk->bthk", x_BTD, self.wq[...])
    k_BTHK = dense("btd,dhk->bthk", x_BTD, self.wk[...])
    v_BTHK = dense("btd,dhk->bthk", x_BTD, self.wv[...])
    return rope(q_BTHK, positions_BT, self.rope_base), rope(k_BTHK, positions_BT, self.rope_base), v_BTHK

  def attend(self, q_BTHK, k_BSHK, v_BSHK, mask_TS, q_blocks: int | None = None) -> jax.Array:
    """Softmax attention of T queries over S keys under mask_TS, projected back to d_model.

    mask_TS must be causal with keys end-aligned to queries (query i sees no key past
    i + S - T), as every caller's mask is. Queries are processed in q_blocks blocks, each
    against only the keys it can see: a causal T x T attention computes (nb + 1) / 2nb of
    the scores instead of all of them, and each block's scores stay cache-sized (on the
    CPU, 4 blocks make attention fwd+bwd 1.7x faster at T = 512). Heads go first so
    both products are plain batched matmuls.
    """
    T, S = q_BTHK.shape[1], k_BSHK.shape[1]
    nb = q_blocks or (4 if T >= 256 and T % 4 == 0 else 1)
    scale = q_BTHK.shape[-1] ** -0.5
    q_BHTK, k_BHSK, v_BHSK = (jnp.swapaxes(a, 1, 2) for a in (q_BTHK, k_BSHK, v_BSHK))
    outs = []
    for i in range(nb):
      qs, qe = i * T // nb, (i + 1) * T // nb
      ke = qe + S - T  # the last key any query of this block may see
      logits_BHtS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK[:, :, qs:qe], k_BHSK[:, :, :ke]).astype(jnp.float32) * scale
      logits_BHtS = jnp.where(mask_TS[qs:qe, :ke], logits_BHtS, -1e30)
      probs_BHtS = jax.nn.softmax(logits_BHtS, axis=-1).astype(v_BSHK.dtype)
      outs.append(jnp.einsum("bhts,bhsk->bhtk", probs_BHtS, v_BHSK[:, :, :ke]))
    out_BHTK = outs[0] if nb == 1 else jnp.concatenate(outs, axis=2)
    return dense("bhtk,hkd->btd", out_BHTK, self.wo[...])

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, eviction: str = "none", chunk_len: int = 1) -> jax.Array:
    q, k, v = self.qkv(x_BTD, positions_BT)
    mask_TS = attention_mask(positions_BT[0], positions_BT[0], eviction, chunk_len)
    return self.attend(q, k, v, mask_TS)

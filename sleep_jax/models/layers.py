"""Shared Flax NNX layers: norms, embeddings, SwiGLU MLP, RoPE attention with eviction masks.

Parameters carry logical axis names (`sharding_names`) that `sharding.py` maps to mesh axes.
Compute dtype is chosen by the caller (params are cast before the forward pass), so layers
never cast parameters themselves; softmax and norms run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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
    gate_BTF = jnp.einsum("btd,df->btf", x_BTD, self.w_gate[...])
    up_BTF = jnp.einsum("btd,df->btf", x_BTD, self.w_up[...])
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, self.w_down[...])


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (half-split convention)."""
  half = x_BTHK.shape[-1] // 2
  freq_K = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTK = positions_BT[..., None].astype(jnp.float32) * freq_K
  sin, cos = jnp.sin(angle_BTK)[:, :, None, :], jnp.cos(angle_BTK)[:, :, None, :]
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
    q_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, self.wq[...])
    k_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, self.wk[...])
    v_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, self.wv[...])
    return rope(q_BTHK, positions_BT, self.rope_base), rope(k_BTHK, positions_BT, self.rope_base), v_BTHK

  def attend(self, q_BTHK, k_BSHK, v_BSHK, mask_TS) -> jax.Array:
    scale = q_BTHK.shape[-1] ** -0.5
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK).astype(jnp.float32) * scale
    logits_BHTS = jnp.where(mask_TS, logits_BHTS, -1e30)
    probs_BHTS = jax.nn.softmax(logits_BHTS, axis=-1).astype(v_BSHK.dtype)
    out_BTHK = jnp.einsum("bhts,bshk->bthk", probs_BHTS, v_BSHK)
    return jnp.einsum("bthk,hkd->btd", out_BTHK, self.wo[...])

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, eviction: str = "none", chunk_len: int = 1) -> jax.Array:
    q, k, v = self.qkv(x_BTD, positions_BT)
    mask_TS = attention_mask(positions_BT[0], positions_BT[0], eviction, chunk_len)
    return self.attend(q, k, v, mask_TS)

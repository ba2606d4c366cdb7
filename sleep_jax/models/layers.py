"""Shared Flax NNX layers: parameters with logical axes, RMSNorm, SwiGLU, short causal convs.

Parameters carry logical axis names (`sharding_names`) that `sharding.py` maps to mesh axes.
Compute dtype is chosen by the caller (params are cast before the forward pass), so layers
never cast parameters themselves; softmax and norms run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.models.adapters import project, sub
from sleep_jax.models.roles import NoDecay

nnx.use_eager_sharding(False)  # shardings are applied by jax.jit(out_shardings=...), not eagerly


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float | None, *,
          kind: type = nnx.Param, fan_in: tuple | None = None, **metadata) -> nnx.Param:
  """A parameter with logical axis names; std=None means ones (norm scales), 0 zeros.

  kind: its variable type (models/roles.py: Param, NoDecay, ExpertFlag); fan_in: the axes it
  contracts over (default: a weight's first axis; none for NoDecay kinds); metadata: more
  role tags (proj=..., out_proj=True)."""
  if std is None:
    value = jnp.ones(shape, jnp.float32)
  elif std == 0.0:
    value = jnp.zeros(shape, jnp.float32)
  else:
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
  if fan_in is None:
    fan_in = tuple(names[:1]) if kind is nnx.Param else ()
  return kind(value, out_sharding=names, fan_in=tuple(fan_in), **metadata)


class RMSNorm(nnx.Module):
  """x / rms(x) * (offset + scale), in float32. offset = 1 is the zero-centred form of
  Qwen3.5 / Gemma (scale initialised at 0); the default is Llama's (scale at 1)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, offset: float = 0.0, axis_name: str = "embed"):
    self.scale = param(rngs, (dim,), (axis_name,), 0.0 if offset else None, kind=NoDecay)
    self.eps = eps
    self.offset = offset

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward block."""

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, std: float):
    self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std, proj="gate")
    self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std, proj="up")
    self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), std / 2, proj="down", out_proj=True)

  def __call__(self, x_BTD: jax.Array, ad: dict | None = None) -> jax.Array:
    """ad: this MLP's adapters (models/adapters.py), or None."""
    gate_BTF = project("btd,df->btf", x_BTD, self.w_gate[...], sub(ad, "w_gate"))
    up_BTF = project("btd,df->btf", x_BTD, self.w_up[...], sub(ad, "w_up"))
    return project("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, self.w_down[...], sub(ad, "w_down"))


def causal_taps(x_BTC: jax.Array, w_back_W: jax.Array, valid, cache_BWC: jax.Array | None):
  """sum_i w_back[i] * x_{t-i} over the taps that `valid` allows -> (y, new cache).

  Written as a sum of W shifted products (W is small): the same formula serves a whole
  sequence, a chunk and a single decoded token, so every path rounds identically.
  valid: bool [W, T] or [B, W, T] (tap i of call token t reads a visible input);
  cache: the W - 1 inputs before x (None: nothing before the call).
  """
  W, (B, T, C) = w_back_W.shape[0], x_BTC.shape
  if cache_BWC is None:
    cache_BWC = jnp.zeros((B, W - 1, C), x_BTC.dtype)
  xp = jnp.concatenate([cache_BWC.astype(x_BTC.dtype), x_BTC], axis=1)  # [B, W - 1 + T, C]
  v_BWT = valid if valid.ndim == 3 else valid[None]
  w = w_back_W.astype(x_BTC.dtype)
  y = sum(jnp.where(v_BWT[:, i, :, None], xp[:, W - 1 - i:W - 1 - i + T], 0) * w[i] for i in range(W))
  return y, xp[:, T:]


class ShortConv(nnx.Module):
  """x_t + sum_i w_i * x_{t-i}, i < W: a depthwise causal conv with a residual ("Canon" layer).

  Placed before attention's q/k/v projections it hands each position its last W - 1
  neighbours, so a single attention layer can match a multi-token key (an induction head
  needs a previous-token head below it otherwise): in-context recall is learnt in far fewer
  steps (experiments/probe_recall.py). Its taps never cross an eviction or a document.
  """

  def __init__(self, width: int, dim: int, *, rngs: nnx.Rngs):
    self.w = param(rngs, (width, dim), (None, "embed"), 1.0 / width, fan_in=())  # depthwise

  def __call__(self, x_BTD: jax.Array, valid, cache_BWD: jax.Array | None = None):
    y, cache = causal_taps(x_BTD, self.w[...], valid, cache_BWD)
    return x_BTD + y, cache


def short_conv(cfg, rngs: nnx.Rngs) -> ShortConv | None:
  """The attention input's ShortConv of a ModelConfig (None when model.attn_conv is 0)."""
  return ShortConv(cfg.attn_conv, cfg.d_model, rngs=rngs) if cfg.attn_conv else None

"""Gated DeltaNet block (the fast-weight mixer of Paper A's hybrid), Flax NNX.

    x -> q, k, v = short causal depthwise conv(x W) + SiLU;  q, k L2-normalised per head
      -> alpha = exp(-exp(a_log) * softplus(x w_a + dt_bias))   (decay, in (0, 1))
         beta  = sigmoid(x w_b)                                   (write strength, in (0, 1))
      -> o, S = gated_delta_rule(q, k, v, alpha, beta, initial_state=S)
      -> per-head RMSNorm(o) * SiLU(x W_g) -> W_o

The fast weights S [B, H, V, K] are data passed in and returned, never module state.

Conv cache. The convolution needs the last `gdn_conv - 1` projected inputs before a chunk.
In Algorithm 1 the features of a chunk are discarded at its boundary and only S survives,
so every run over a chunk (every sleep pass, and wake decoding from the chunk's first
token) starts with a zero conv cache: `__call__` takes none, and the decoder resets the
cache it carries in `step` whenever a new chunk begins. This keeps "only S crosses a chunk
boundary" literally true, and makes pass n of a chunk depend on the previous chunk only
through S.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.config import ModelConfig
from sleep_jax.models.layers import param
from sleep_jax.ops.dense import dense
from sleep_jax.ops.gated_delta import gated_delta_rule, gated_delta_step

# log(alpha) is clamped here: the chunkwise op works with log(alpha), and alpha underflowing
# to 0 would give -inf - -inf = nan in its decay ratios. exp(-20) already forgets everything.
LOG_ALPHA_MIN = -20.0
_EPS = 1e-6


def _init_param(rngs: nnx.Rngs, value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
  """A parameter with a custom initial value (through `param`, so metadata stays uniform)."""
  p = param(rngs, value.shape, names, 0.0)
  p[...] = value.astype(jnp.float32)
  return p


def l2norm(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + _EPS)).astype(x.dtype)


def causal_conv(x_BTHC: jax.Array, w_WHC: jax.Array, cache_BWHC: jax.Array | None):
  """Depthwise causal conv of width W. cache: the W - 1 inputs before x (None: zeros).

  Written as a sum of W shifted products (W is 4): the same formula serves a chunk and a
  single decoding token, so both paths round identically. Returns (y, new cache).
  """
  W = w_WHC.shape[0]
  B, T, H, C = x_BTHC.shape
  if cache_BWHC is None:
    cache_BWHC = jnp.zeros((B, W - 1, H, C), x_BTHC.dtype)
  xp = jnp.concatenate([cache_BWHC.astype(x_BTHC.dtype), x_BTHC], axis=1)  # [B, W-1+T, H, C]
  y = sum(xp[:, i:i + T] * w_WHC[i] for i in range(W))
  return y, xp[:, T:]


class HeadRMSNorm(nnx.Module):
  """RMSNorm over each head's V channels, one scale shared by the heads (as in GDN/FLA).

  A module with a `scale` leaf, so the optimizer's no-weight-decay rule for norm scales
  (leaf name "scale") covers it.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), ("kv",), None)

  def __call__(self, o_BTHV: jax.Array) -> jax.Array:
    o = o_BTHV.astype(jnp.float32)
    return o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + _EPS) * self.scale[...].astype(jnp.float32)


class GatedDeltaNet(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, H, K, W = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.gdn_conv
    std = cfg.init_std
    if W < 1:
      raise ValueError(f"model.gdn_conv must be >= 1, got {W}")
    self.wq = param(rngs, (D, H, K), ("embed", "heads", "kv"), std)
    self.wk = param(rngs, (D, H, K), ("embed", "heads", "kv"), std)
    self.wv = param(rngs, (D, H, K), ("embed", "heads", "kv"), std)
    # One depthwise filter over the concatenated q|k|v channels of each head.
    self.conv = param(rngs, (W, H, 3 * K), (None, "heads", "kv"), 1.0 / math.sqrt(W))
    self.wa = param(rngs, (D, H), ("embed", "heads"), std)
    self.wb = param(rngs, (D, H), ("embed", "heads"), std)
    self.wg = param(rngs, (D, H, K), ("embed", "heads", "kv"), std)
    self.wo = param(rngs, (H, K, D), ("heads", "kv", "embed"), std / 2)
    self.o_norm = HeadRMSNorm(K, rngs=rngs)
    # Mamba-2 / GDN decay parametrisation: A in [1, 16], softplus(dt_bias) log-uniform in
    # [1e-3, 1e-1], so the initial per-token decay exp(-A dt) spans slow and fast heads.
    self.a_log = _init_param(rngs, jnp.log(jax.random.uniform(rngs.params(), (H,), minval=1.0, maxval=16.0)),
                             ("heads",))
    dt = jnp.exp(jax.random.uniform(rngs.params(), (H,), minval=math.log(1e-3), maxval=math.log(1e-1)))
    self.dt_bias = _init_param(rngs, dt + jnp.log(-jnp.expm1(-dt)), ("heads",))  # softplus^-1(dt)
    self.chunk = cfg.gdn_chunk

  def features(self, x_BTD: jax.Array, conv_cache=None):
    """x -> (q, k, v, alpha, beta, gate, new conv cache); q, k unit-norm per head."""
    K = self.wq.shape[-1]
    qkv_BTHC = jnp.concatenate([dense("btd,dhk->bthk", x_BTD, w[...]) for w in (self.wq, self.wk, self.wv)],
                               axis=-1)
    qkv_BTHC, conv_cache = causal_conv(qkv_BTHC, self.conv[...], conv_cache)
    qkv_BTHC = jax.nn.silu(qkv_BTHC)
    q_BTHK, k_BTHK, v_BTHK = l2norm(qkv_BTHC[..., :K]), l2norm(qkv_BTHC[..., K:2 * K]), qkv_BTHC[..., 2 * K:]
    dt_BTH = jax.nn.softplus(jnp.einsum("btd,dh->bth", x_BTD, self.wa[...]).astype(jnp.float32)
                             + self.dt_bias[...].astype(jnp.float32))
    log_alpha_BTH = jnp.maximum(-jnp.exp(self.a_log[...].astype(jnp.float32)) * dt_BTH, LOG_ALPHA_MIN)
    beta_BTH = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x_BTD, self.wb[...]).astype(jnp.float32))
    gate_BTHK = dense("btd,dhk->bthk", x_BTD, self.wg[...])
    return q_BTHK, k_BTHK, v_BTHK, jnp.exp(log_alpha_BTH), beta_BTH, gate_BTHK, conv_cache

  def output(self, o_BTHV: jax.Array, gate_BTHV: jax.Array) -> jax.Array:
    o = (self.o_norm(o_BTHV) * jax.nn.silu(gate_BTHV.astype(jnp.float32))).astype(gate_BTHV.dtype)
    return dense("bthv,hvd->btd", o, self.wo[...])

  def __call__(self, x_BTD: jax.Array, S_BHVK: jax.Array):
    """One run over a chunk from state S (zero conv cache). Returns (y_BTD, new S)."""
    q, k, v, alpha, beta, gate, _ = self.features(x_BTD)
    chunk = max(1, min(self.chunk, x_BTD.shape[1]))  # no padding a short chunk up to gdn_chunk
    o_BTHV, S_BHVK = gated_delta_rule(q, k, v, alpha, beta, initial_state=S_BHVK, mode="chunk", chunk_size=chunk)
    return self.output(o_BTHV, gate), S_BHVK

  def step(self, x_BD: jax.Array, S_BHVK: jax.Array, conv_BWHC: jax.Array):
    """One decoding token. Returns (y_BD, new S, new conv cache)."""
    q, k, v, alpha, beta, gate, conv_BWHC = self.features(x_BD[:, None], conv_BWHC)
    o_BHV, S_BHVK = gated_delta_step(S_BHVK, q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], beta[:, 0])
    return self.output(o_BHV[:, None].astype(v.dtype), gate)[:, 0], S_BHVK, conv_BWHC

  def conv_cache_shape(self, batch: int) -> tuple[int, ...]:
    W, H, C = self.conv.shape
    return (batch, W - 1, H, C)

"""Gated DeltaNet mixer (the fast-weight layer of paper A's hybrids and of Qwen3.5 /
Qwen3-Next), Flax NNX.

    x -> q, k, v = SiLU(short causal depthwise conv(x W_q | x W_k | x W_v))
      -> q, k L2-normalised per head (q also scaled by d_k^-0.5 with gdn_q_scale)
      -> alpha = exp(-exp(a_log) * softplus(x w_a + dt_bias))   (decay, in (0, 1))
         beta  = sigmoid(x w_b)                                   (write strength, in (0, 1))
      -> o, S = gated_delta_rule(q, k, v, alpha, beta, initial_state=S)
      -> per-head RMSNorm(o) * SiLU(x W_g) -> W_o

Query/key heads (gdn_k_heads, size gdn_k_dim) and value heads (gdn_v_heads, size gdn_v_dim)
are counted separately, as in Qwen3.5: each q/k head serves gdn_v_heads / gdn_k_heads
consecutive value heads. The fast weights S [B, Hv, Vd, Kd] are data passed in and returned,
never module state. At the first token of a document (segment start) alpha is 0, so nothing
of S crosses a document boundary; the conv taps never cross one either (nor an eviction).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.models.adapters import project, sub
from sleep_jax.models.layers import RMSNorm, causal_taps, param
from sleep_jax.models.roles import NoDecay
from sleep_jax.ops.gated_delta import gated_delta_rule, gated_delta_step

# log(alpha) is clamped here: the chunkwise op works with log(alpha), and alpha underflowing
# to 0 would give -inf - -inf = nan in its decay ratios. exp(-20) already forgets everything.
LOG_ALPHA_MIN = -20.0
_EPS = 1e-6


def gdn_dims(cfg) -> tuple[int, int, int, int]:
  """(Hk, Hv, dk, dv) of a ModelConfig's GDN layers."""
  hk = cfg.gdn_k_heads or cfg.n_heads
  return hk, cfg.gdn_v_heads or hk, cfg.gdn_k_dim or cfg.head_dim, cfg.gdn_v_dim or cfg.head_dim


def _init_param(rngs: nnx.Rngs, value: jax.Array, names: tuple[str | None, ...], **kw) -> nnx.Param:
  """A parameter with a custom initial value (through `param`, so metadata stays uniform)."""
  p = param(rngs, value.shape, names, 0.0, **kw)
  p[...] = value.astype(jnp.float32)
  return p


def l2norm(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + _EPS)).astype(x.dtype)


class GatedDeltaNet(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    D, W, std = cfg.d_model, cfg.gdn_conv, cfg.init_std
    Hk, Hv, dk, dv = gdn_dims(cfg)
    if W < 1:
      raise ValueError(f"model.gdn_conv must be >= 1, got {W}")
    if Hv % Hk:
      raise ValueError(f"model.gdn_v_heads ({Hv}) must be a multiple of model.gdn_k_heads ({Hk})")
    self.wq = param(rngs, (D, Hk, dk), ("embed", "heads", "kv"), std, proj="q")
    self.wk = param(rngs, (D, Hk, dk), ("embed", "heads", "kv"), std, proj="k")
    self.wv = param(rngs, (D, Hv, dv), ("embed", "heads", "kv"), std, proj="v")
    # Depthwise filters over the q, k and v channels; tap W - 1 multiplies the current token.
    # One draw for all three (laid out per head as q|k|v when the head shapes agree, as the
    # single filter of earlier versions was), so a seed gives the model it gave before.
    std_conv = 1.0 / math.sqrt(W)
    draw = lambda shape: std_conv * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    if (Hk, dk) == (Hv, dv):
      w = draw((W, Hk, 3 * dk))
      cq, ck, cv = w[..., :dk], w[..., dk:2 * dk], w[..., 2 * dk:]
    else:
      w = draw((W, 2 * Hk * dk + Hv * dv))
      cq, ck, cv = (w[:, a:b].reshape(W, h, d) for a, b, h, d in (
          (0, Hk * dk, Hk, dk), (Hk * dk, 2 * Hk * dk, Hk, dk), (2 * Hk * dk, w.shape[1], Hv, dv)))
    self.conv_q = _init_param(rngs, cq, (None, "heads", "kv"), fan_in=())  # depthwise
    self.conv_k = _init_param(rngs, ck, (None, "heads", "kv"), fan_in=())
    self.conv_v = _init_param(rngs, cv, (None, "heads", "kv"), fan_in=())
    self.wa = param(rngs, (D, Hv), ("embed", "heads"), std, proj="alpha")
    self.wb = param(rngs, (D, Hv), ("embed", "heads"), std, proj="beta")
    self.wg = param(rngs, (D, Hv, dv), ("embed", "heads", "kv"), std, proj="out_gate")
    self.wo = param(rngs, (Hv, dv, D), ("heads", "kv", "embed"), std / 2, proj="o", out_proj=True,
                    fan_in=("heads", "kv"))
    # One RMSNorm scale over each head's V channels, shared by the heads (as in FLA / Qwen3.5's
    # RMSNormGated, whose weight is never zero-centred); a `scale` leaf, so no weight decay.
    self.o_norm = RMSNorm(dv, rngs=rngs, eps=cfg.norm_eps, axis_name="kv")
    # Mamba-2 / GDN decay parametrisation: A in [1, 16], softplus(dt_bias) log-uniform in
    # [1e-3, 1e-1], so the initial per-token decay exp(-A dt) spans slow and fast heads.
    self.a_log = _init_param(rngs, jnp.log(jax.random.uniform(rngs.params(), (Hv,), minval=1.0, maxval=16.0)),
                             ("heads",), kind=NoDecay)
    dt = jnp.exp(jax.random.uniform(rngs.params(), (Hv,), minval=math.log(1e-3), maxval=math.log(1e-1)))
    self.dt_bias = _init_param(rngs, dt + jnp.log(-jnp.expm1(-dt)), ("heads",), kind=NoDecay)  # softplus^-1(dt)
    self.chunk = cfg.gdn_chunk
    self.q_scale = dk ** -0.5 if cfg.gdn_q_scale else 1.0

  def conv_channels(self) -> int:
    return sum(math.prod(w.shape[1:]) for w in (self.conv_q, self.conv_k, self.conv_v))

  def features(self, x_BTD, valid, new_seg_BT, conv_cache, ad=None):
    """x -> (q, k, v, alpha, beta, gate, new conv cache); q, k unit-norm per head, repeated
    to the value heads. ad: this module's adapters (models/adapters.py), or None."""
    B, T, _ = x_BTD.shape
    (W, Hk, dk), (Hv, dv) = self.conv_q.shape, self.conv_v.shape[1:]
    parts = [project("btd,dhk->bthk", x_BTD, w[...], sub(ad, n)) for n, w in (("wq", self.wq), ("wk", self.wk),
                                                                              ("wv", self.wv))]
    x_BTC = jnp.concatenate([p.reshape(B, T, -1) for p in parts], axis=-1)
    w_WC = jnp.concatenate([w[...].reshape(W, -1) for w in (self.conv_q, self.conv_k, self.conv_v)], axis=-1)
    x_BTC, conv_cache = causal_taps(x_BTC, w_WC[::-1], valid, conv_cache)
    x_BTC = jax.nn.silu(x_BTC)
    q = l2norm(x_BTC[..., :Hk * dk].reshape(B, T, Hk, dk))
    k = l2norm(x_BTC[..., Hk * dk:2 * Hk * dk].reshape(B, T, Hk, dk))
    v = x_BTC[..., 2 * Hk * dk:].reshape(B, T, Hv, dv)
    if self.q_scale != 1.0:
      q = q * jnp.asarray(self.q_scale, q.dtype)
    if Hv != Hk:
      q, k = jnp.repeat(q, Hv // Hk, axis=2), jnp.repeat(k, Hv // Hk, axis=2)
    dt_BTH = jax.nn.softplus(project("btd,dh->bth", x_BTD, self.wa[...], sub(ad, "wa"), plain=True).astype(jnp.float32)
                             + self.dt_bias[...].astype(jnp.float32))
    log_alpha_BTH = jnp.maximum(-jnp.exp(self.a_log[...].astype(jnp.float32)) * dt_BTH, LOG_ALPHA_MIN)
    alpha_BTH = jnp.where(new_seg_BT[..., None], 0.0, jnp.exp(log_alpha_BTH)) if new_seg_BT is not None \
        else jnp.exp(log_alpha_BTH)
    beta_BTH = jax.nn.sigmoid(project("btd,dh->bth", x_BTD, self.wb[...], sub(ad, "wb"), plain=True)
                              .astype(jnp.float32))
    gate_BTHV = project("btd,dhk->bthk", x_BTD, self.wg[...], sub(ad, "wg"))
    return q, k, v, alpha_BTH, beta_BTH, gate_BTHV, conv_cache

  def output(self, o_BTHV, gate_BTHV, ad=None):
    o = (self.o_norm(o_BTHV.astype(jnp.float32)) * jax.nn.silu(gate_BTHV.astype(jnp.float32))).astype(gate_BTHV.dtype)
    return project("bthv,hvd->btd", o, self.wo[...], sub(ad, "wo"))

  def __call__(self, x_BTD, S_BHVK, *, valid, new_seg_BT=None, conv_cache=None, ad=None):
    """(y [B, T, D], new S, new conv cache). valid: conv tap mask (layers.causal_taps);
    ad: this layer's GDN adapters (models/adapters.py), or None."""
    q, k, v, alpha, beta, gate, conv_cache = self.features(x_BTD, valid, new_seg_BT, conv_cache, ad)
    if x_BTD.shape[1] == 1:  # one decoded token: the recurrence itself
      o, S_BHVK = gated_delta_step(S_BHVK, q[:, 0], k[:, 0], v[:, 0], alpha[:, 0], beta[:, 0])
      o = o[:, None].astype(v.dtype)
    else:
      chunk = max(1, min(self.chunk, x_BTD.shape[1]))  # no padding a short chunk up to gdn_chunk
      o, S_BHVK = gated_delta_rule(q, k, v, alpha, beta, initial_state=S_BHVK, mode="chunk", chunk_size=chunk)
    return self.output(o, gate, ad), S_BHVK, conv_cache

  def state_shapes(self, batch: int):
    """(S shape, conv cache shape) for one layer."""
    (W, _, dk), (Hv, dv) = self.conv_q.shape, self.conv_v.shape[1:]
    return (batch, Hv, dv, dk), (batch, W - 1, self.conv_channels())

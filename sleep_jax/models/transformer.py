"""The full-attention baseline: a pre-norm causal transformer LM (RoPE, SwiGLU).

Layers are stacked (a leading "layers" axis on every block parameter) and run with
`lax.scan`, each layer optionally rematerialised, so compile time and activation memory do
not grow with depth. `eviction` turns the same model into the hard-eviction (chance) or
sliding-window baselines of the sleep experiments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.config import ModelConfig
from sleep_jax.models.layers import MLP, Attention, RMSNorm, param, short_conv


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.head_dim, rngs=rngs, std=cfg.init_std, rope_base=cfg.rope_base)
    self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.mlp = MLP(cfg.d_model, cfg.d_ff, rngs=rngs, std=cfg.init_std)
    self.conv = short_conv(cfg, rngs)

  def attn_input(self, x_BTD, positions_BT, eviction: str, chunk_len: int):
    a_BTD = self.attn_norm(x_BTD)
    return a_BTD if self.conv is None else self.conv(a_BTD, positions_BT, eviction, chunk_len)

  def mlp_residual(self, x_BTD):
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))

  def __call__(self, x_BTD, positions_BT, eviction: str, chunk_len: int):
    x_BTD = x_BTD + self.attn(self.attn_input(x_BTD, positions_BT, eviction, chunk_len), positions_BT,
                              eviction, chunk_len)
    return self.mlp_residual(x_BTD)


def stacked(make, n: int, rngs: nnx.Rngs):
  """n copies of a module with parameters stacked on a leading "layers" axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make(r)

  return create(rngs)


def scan_layers(layers: nnx.Module, x, body, *, remat: bool, unroll: bool = False):
  """x -> body(layer_i, x) for each stacked layer, as a lax.scan over pure parameter state."""
  graphdef, state = nnx.split(layers)

  def step(carry, layer_state):
    return body(nnx.merge(graphdef, layer_state), carry), None

  if remat:
    step = jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable)
  if unroll:
    n = jax.tree.leaves(state)[0].shape[0]
    for i in range(n):
      x, _ = step(x, jax.tree.map(lambda a: a[i], state))
    return x
  return jax.lax.scan(step, x, state)[0]


class Transformer(nnx.Module):
  block_cls = Block  # the CMS model (models/cms.py) swaps in its own block

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0)
    self.blocks = stacked(lambda r: self.block_cls(cfg, rngs=r), cfg.n_layers, rngs)
    self.final_norm = RMSNorm(cfg.d_model, rngs=rngs)
    self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)

  def __call__(self, tokens_BT: jax.Array, *, eviction: str | None = None, chunk_len: int = 1) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V] (float32)."""
    cfg = self.cfg
    eviction = cfg.eviction if eviction is None else eviction
    dtype = jnp.dtype(cfg.compute_dtype)
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype)
    body = lambda block, x: block(x, positions_BT, eviction, chunk_len)
    x_BTD = scan_layers(self.blocks, x_BTD, body, remat=cfg.remat, unroll=not cfg.scan_layers)
    x_BTD = self.final_norm(x_BTD)
    return jnp.einsum("btd,dv->btv", x_BTD, self.unembed[...].astype(dtype)).astype(jnp.float32)

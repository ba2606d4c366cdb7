"""Continuum Memory System MLPs (paper B): the MLP of every decoder layer of model.kind = cms
is a chain of levels, fast to slow (cfg.cms.d_ff[l], level 0 fastest):

  x = x + Level_l(norm_l(x))       for l = 0 .. n_levels - 1
  Level(x) = SwiGLU_l(x) + sum_e g_e(x) * silu(x A_e) B_e          A_e [d, r], B_e [r, d]

The experts are pre-allocated slots, masked until activated (`active` = 0 or 1), so every
shape is static under jit and expansion is a pure edit of the parameter pytree
(seeding/expand.py). The gate g_e = active_e * sigmoid(x . w_e + bias_e) is a per-expert
sigmoid, not a softmax: activating expert e with B_e = 0 leaves every other gate, hence the
whole function, unchanged (a softmax router would rescale the others). With top_k > 0 only
the k highest-scoring active experts fire per token (sparse); expansion is then exact as
long as fewer than k experts were active.

Levels are updated at different frequencies (cfg.cms.update_every, "chunk sizes" in steps):
train.make_optimizer labels each parameter by its CMS level. Every parameter of a level is
tagged with its level, part (norm / mlp / expert) and expert slot (models/roles.py), which
is how seeding and dreaming find them in any architecture.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.models.adapters import project, sub
from sleep_jax.models.layers import MLP, RMSNorm, param
from sleep_jax.models.roles import ExpertFlag, NoDecay, tag


class LowRankExpert(nnx.Module):
  def __init__(self, d_model: int, rank: int, *, rngs: nnx.Rngs, slot: int = 0):
    # A random so that B receives gradients once the expert is active; B = 0 so activating
    # it changes nothing (function-preserving expansion).
    self.a = param(rngs, (d_model, rank), ("embed", None), d_model ** -0.5, proj="a")
    self.b = param(rngs, (rank, d_model), (None, "embed"), 0.0, proj="b", out_proj=True)
    self.gate = param(rngs, (d_model,), ("embed",), 0.0, proj="router")  # router column
    self.bias = param(rngs, (), (), 0.0, kind=NoDecay, proj="router_bias")
    self.active = param(rngs, (), (), 0.0, kind=ExpertFlag)  # 0/1, never trained (stop_gradient)
    tag(self, cms_part="expert", expert_slot=slot)

  def score(self, x_BTD):
    return jnp.einsum("btd,d->bt", x_BTD, self.gate[...]).astype(jnp.float32) + self.bias[...]

  def __call__(self, x_BTD, ad=None):
    h_BTR = jax.nn.silu(project("btd,dr->btr", x_BTD, self.a[...], sub(ad, "a"), plain=True))
    return project("btr,rd->btd", h_BTR, self.b[...], sub(ad, "b"), plain=True)


class CMSLevel(nnx.Module):
  def __init__(self, d_model: int, d_ff: int, cms, *, rngs: nnx.Rngs, std: float, level: int = 0):
    self.norm = RMSNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, d_ff, rngs=rngs, std=std)
    self.experts = nnx.List([LowRankExpert(d_model, cms.rank, rngs=rngs, slot=e) for e in range(cms.experts)])
    self.top_k = cms.top_k
    tag(self.norm, cms_part="norm")
    tag(self.mlp, cms_part="mlp")
    tag(self, cms_level=level)

  def gates(self, x_BTD) -> jax.Array:
    """g [E, B, T] float32: zero for inactive experts (and, with top_k, all but the k best)."""
    active_E = jnp.stack([jax.lax.stop_gradient(e.active[...]) for e in self.experts])
    score_EBT = jnp.stack([e.score(x_BTD) for e in self.experts])
    g_EBT = active_E[:, None, None] * jax.nn.sigmoid(score_EBT)
    if 0 < self.top_k < len(self.experts):
      ranked = jnp.where(active_E[:, None, None] > 0, score_EBT, -jnp.inf)
      kth_BT = jax.lax.top_k(jnp.moveaxis(ranked, 0, -1), self.top_k)[0][..., -1]
      g_EBT = jnp.where(ranked >= kth_BT, g_EBT, 0.0)
    return g_EBT

  def __call__(self, x_BTD, ad=None):
    """ad: this level's adapters (models/adapters.py), or None."""
    x = self.norm(x_BTD)
    out = self.mlp(x, sub(ad, "mlp"))
    if not len(self.experts):
      return out

    def with_experts(out):
      g_EBT = self.gates(x)
      for i, expert in enumerate(self.experts):
        out = out + g_EBT[i][..., None].astype(out.dtype) * expert(x, sub(ad, "experts", i))
      return out

    # Slots are pre-allocated and stay inactive until expansion, so a level often has none
    # active (every level of a fresh model, the fast levels of a dreaming model): all its
    # gates are then exactly 0 and the experts add exactly 0, so skip their products and
    # gates (forward and backward; a third of a small CMS layer's work). The flags are
    # parameters, not data, so under a vmap over data or adapters this stays a branch.
    active = jnp.stack([jax.lax.stop_gradient(e.active[...]) for e in self.experts])
    return jax.lax.cond(jnp.any(active > 0), with_experts, lambda o: o, out)

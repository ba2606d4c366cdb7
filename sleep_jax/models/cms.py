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
see `cms_update_labels`, used by train.make_optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sleep_jax.models.layers import MLP, RMSNorm, param


class LowRankExpert(nnx.Module):
  def __init__(self, d_model: int, rank: int, *, rngs: nnx.Rngs):
    # A random so that B receives gradients once the expert is active; B = 0 so activating
    # it changes nothing (function-preserving expansion).
    self.a = param(rngs, (d_model, rank), ("embed", None), d_model ** -0.5)
    self.b = param(rngs, (rank, d_model), (None, "embed"), 0.0)
    self.gate = param(rngs, (d_model,), ("embed",), 0.0)  # router column
    self.bias = param(rngs, (), (), 0.0)
    self.active = param(rngs, (), (), 0.0)  # 0/1 flag, never trained (stop_gradient, no decay)

  def score(self, x_BTD):
    return jnp.einsum("btd,d->bt", x_BTD, self.gate[...]).astype(jnp.float32) + self.bias[...]

  def __call__(self, x_BTD):
    return jnp.einsum("btr,rd->btd", jax.nn.silu(jnp.einsum("btd,dr->btr", x_BTD, self.a[...])), self.b[...])


class CMSLevel(nnx.Module):
  def __init__(self, d_model: int, d_ff: int, cms, *, rngs: nnx.Rngs, std: float):
    self.norm = RMSNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, d_ff, rngs=rngs, std=std)
    self.experts = nnx.List([LowRankExpert(d_model, cms.rank, rngs=rngs) for _ in range(cms.experts)])
    self.top_k = cms.top_k

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

  def __call__(self, x_BTD):
    x = self.norm(x_BTD)
    out = self.mlp(x)
    g_EBT = self.gates(x)
    for i, expert in enumerate(self.experts):
      out = out + g_EBT[i][..., None].astype(out.dtype) * expert(x)
    return out


def level_of(path) -> int | None:
  """CMS level index of a parameter path (blocks/levels/<l>/...), None outside the chain."""
  keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
  for a, b in zip(keys, keys[1:]):
    if a == "levels":
      return int(b)
  return None


def cms_update_labels(params) -> object:
  """Per-leaf optimizer labels: 'level<l>' inside the CMS chain, 'rest' elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "rest" if level_of(path) is None else f"level{level_of(path)}", params)


# -- the CMS chain inside a decoder's parameter dict (any architecture: every layer group whose
#    layers carry `levels`) ---------------------------------------------------------------
def cms_groups(params: dict) -> list:
  """Keys of params["groups"] whose layers have a CMS chain."""
  groups = params["groups"]
  keys = [g for g in sorted(groups) if "levels" in groups[g]]
  if not keys:
    raise ValueError("this model has no CMS levels (model.kind must be 'cms')")
  return keys


def level_count(params: dict) -> int:
  return len(params["groups"][cms_groups(params)[0]]["levels"])


def expert_slots(params: dict, level: int) -> dict:
  """The expert slots of `level` in the first CMS group (every group has the same slots)."""
  return params["groups"][cms_groups(params)[0]]["levels"][level]["experts"]


def map_levels(params: dict, fn) -> dict:
  """params with fn(level index, level dict) -> level dict applied in every CMS group."""
  groups = dict(params["groups"])
  for g in cms_groups(params):
    levels = {lvl: fn(lvl, sub) for lvl, sub in groups[g]["levels"].items()}
    groups[g] = {**groups[g], "levels": levels}
  return {**params, "groups": groups}

"""Function-preserving expansion of CMS models: expert activation and whole-model growth.

Both act on the pure parameter dict (nnx.to_pure_dict of a cms Decoder), so they run
under jit with the student's out_shardings: the teacher's checkpoint lands directly in the
student's (larger, differently laid out) mesh.

Expert activation: slot e of a level gets active = 1 and B = 0, so its output is exactly 0
(and the sigmoid gates of the other experts do not depend on it): logits are unchanged.

Growth (HyperCloning-style width, Net2Net-style depth), width factor m:
  * the residual stream is tiled, x' = [x, x, ..., x] (m copies); RMSNorm of a tiled vector
    is the tiled RMSNorm, so norm scales are tiled;
  * every weight is tiled along each axis that grows (embed, mlp, heads) and divided by m
    once per grown *input* axis (the contraction sums m identical copies);
  * heads are tiled (head_dim is unchanged, so RoPE and the softmax scale are too);
  * new layers are appended with their output projections (attention wo, MLP w_down) zero
    and every expert inactive: identity layers.
With m a power of two the scaling is exact in floating point; only summation order changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax.config import Config
from sleep_jax.models import roles

GROWN_AXES = ("embed", "mlp", "heads")


def _expert(level: int, slot: int):
  return lambda r: r.cms_level == level and r.expert_slot == slot  # noqa: E731


def set_expert(params: dict, param_roles: dict, level: int, slot: int, *, active: bool) -> dict:
  """Activate (or deactivate) expert `slot` of CMS `level` in every layer, with B = 0 (its
  output projection), so the function does not change."""
  mine = _expert(level, slot)

  def edit(r, x):
    if not mine(r):
      return x
    if r.is_flag:
      return jnp.full_like(x, 1.0 if active else 0.0)
    return jnp.zeros_like(x) if r.out_proj else x

  return roles.edit(params, param_roles, edit)


def set_router_bias(params: dict, param_roles: dict, level: int, slots: list[int], bias: float) -> dict:
  """Start the routers of experts `slots` of CMS `level` at gate sigmoid(bias) on every token
  (their router vectors are 0). Exact for any bias while B = 0: the expert adds 0 however
  open its gate is. A closed start (bias < 0) means an expert writes only where training
  opens its gate, instead of at half strength on every input."""
  def edit(r, x):
    mine = r.cms_level == level and r.expert_slot in slots and r.proj == "router_bias"
    return jnp.full_like(x, bias) if mine else x

  return roles.edit(params, param_roles, edit)


def init_experts_from_mlp(params: dict, param_roles: dict, level: int, slots: list[int]) -> dict:
  """Warm-start experts `slots` of CMS `level`: the input projection A of the j-th slot
  copies gate columns j*r .. (j+1)*r - 1 (mod d_ff) of the same layer's level MLP, so the
  expert starts from keys the layer already computes (its neurons' gate pre-activations)
  instead of random ones; B stays 0, so the function does not change (Net2Net-style
  function-preserving growth). Each A is paired with the gate projection of its own level
  module: the one whose tree path shares the longest prefix with it (structure, not names)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat_roles = jax.tree.leaves(param_roles, is_leaf=roles.is_role)
  gates = [(path, x) for (path, x), r in zip(flat, flat_roles)
           if r.cms_level == level and r.cms_part == "mlp" and r.proj == "gate"]
  if not gates:
    raise ValueError(f"CMS level {level} has no MLP gate projection to copy")

  def shared(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
      n += 1
    return n

  out = []
  for (path, x), r in zip(flat, flat_roles):
    if r.cms_level == level and r.cms_part == "expert" and r.proj == "a" and r.expert_slot in slots:
      gate = max(gates, key=lambda g: shared(g[0], path))[1]  # [(L,) d, d_ff]
      rank, d_ff = x.shape[-1], gate.shape[-1]
      j = slots.index(r.expert_slot)
      x = jnp.take(gate, (j * rank + jnp.arange(rank)) % d_ff, axis=-1).astype(x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def reset_level(params: dict, param_roles: dict, level: int) -> dict:
  """Synaptic pruning: every added expert of `level` inactive with B = 0."""
  for slot in range(roles.expert_slots(param_roles)):
    params = set_expert(params, param_roles, level, slot, active=False)
  return params


def active_slots(params: dict, param_roles: dict, level: int) -> list[int]:
  flags = roles.select(params, param_roles, lambda r: r.is_flag and r.cms_level == level)
  return sorted({r.expert_slot for r, x in flags if float(np.asarray(x).max()) > 0})


def next_free_slot(params: dict, param_roles: dict, level: int) -> int:
  used = active_slots(params, param_roles, level)
  free = [e for e in range(roles.expert_slots(param_roles)) if e not in used]
  if not free:
    raise ValueError(f"CMS level {level} has no free expert slot (raise model.cms.experts)")
  return free[0]


def student_config(cfg: Config) -> Config:
  """The grown student's config: width x grow_width, + grow_layers, its own mesh."""
  s, m = cfg.seeding, cfg.seeding.grow_width
  mc = cfg.model
  cms = dataclasses.replace(mc.cms, d_ff=[f * m for f in mc.cms.d_ff])
  model = dataclasses.replace(mc, d_model=mc.d_model * m, n_heads=mc.n_heads * m, d_ff=mc.d_ff * m,
                              n_layers=mc.n_layers + s.grow_layers, cms=cms)
  return dataclasses.replace(cfg, model=model, mesh=s.student_mesh)


def grow_params(small: dict, small_roles: dict, big_init: dict, *, width: int) -> dict:
  """Grown parameters: `small` expanded into the shapes of `big_init` (a fresh student init,
  whose values fill the appended layers). small_roles: the small model's Role tree (logical
  axes, fan-in axes, output projections, expert flags per leaf)."""

  def grow(r, x, big):
    names = r.names + (None,) * (x.ndim - len(r.names) - int(r.stacked))
    if r.stacked:
      names = ("layers",) + names
    for axis, n in enumerate(names):
      if n in GROWN_AXES and width > 1:
        x = jnp.concatenate([x] * width, axis=axis)
        if n in r.fan_in:
          x = x / width
    if r.stacked and big.shape[0] > x.shape[0]:  # stacked layers: append identity layers
      new = big[x.shape[0]:]
      if r.out_proj or r.is_flag:  # zero branch outputs, inactive experts
        new = jnp.zeros_like(new)
      x = jnp.concatenate([x, new], axis=0)
    if x.shape != big.shape:
      raise ValueError(f"cannot grow a {r.names} parameter: {x.shape} vs student {big.shape}")
    return x.astype(big.dtype)

  return jax.tree.map(grow, small_roles, small, big_init, is_leaf=roles.is_role)

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sleep_jax.config import Config
from sleep_jax.models import cms

GROWN_AXES = ("embed", "mlp", "heads")
# Leaf name -> the logical axes it contracts over (its inputs). Everything else (embedding
# table, norm scales, output projections' outputs) is only tiled.
INPUT_AXES = {"unembed": ("embed",), "wq": ("embed",), "wk": ("embed",), "wv": ("embed",), "wo": ("heads",),
              "w_gate": ("embed",), "w_up": ("embed",), "w_down": ("mlp",), "a": ("embed",), "gate": ("embed",)}
OUTPUT_PROJECTIONS = ("wo", "w_down")  # zeroed in appended layers


def _key(k) -> Any:
  return getattr(k, "key", getattr(k, "idx", k))


def _path(path) -> tuple:
  return tuple(_key(k) for k in path)


def set_expert(params: dict, level: int, slot: int, *, active: bool) -> dict:
  """Activate (or deactivate) expert `slot` of CMS `level` in every layer, with B = 0."""
  def edit(path, x):
    p = _path(path)
    if "levels" in p and p[p.index("levels") + 1] == level and p[-3:-1] == ("experts", slot):
      if p[-1] == "active":
        return jnp.full_like(x, 1.0 if active else 0.0)
      if p[-1] == "b":
        return jnp.zeros_like(x)
    return x

  return jax.tree_util.tree_map_with_path(edit, params)


def reset_level(params: dict, level: int) -> dict:
  """Synaptic pruning: every added expert of `level` inactive with B = 0."""
  n = len(cms.expert_slots(params, level))
  for slot in range(n):
    params = set_expert(params, level, slot, active=False)
  return params


def active_slots(params: dict, level: int) -> list[int]:
  experts = cms.expert_slots(params, level)
  return [e for e in sorted(experts) if float(np.asarray(experts[e]["active"]).max()) > 0]


def next_free_slot(params: dict, level: int) -> int:
  used = active_slots(params, level)
  free = [e for e in sorted(cms.expert_slots(params, level)) if e not in used]
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


def grow_params(small: dict, small_logical: dict, big_init: dict, *, width: int) -> dict:
  """Grown parameters: `small` expanded into the shapes of `big_init` (a fresh student init,
  whose values fill the appended layers). small_logical: logical axis names per leaf."""
  flat_small = dict(jax.tree_util.tree_flatten_with_path(small)[0])
  flat_logical = dict(jax.tree_util.tree_flatten_with_path(small_logical, is_leaf=lambda x: isinstance(x, P))[0])

  def grow(path, big):
    x = flat_small[path]
    names = tuple(flat_logical[path] or ())
    names = names + (None,) * (x.ndim - len(names))
    name = _key(path[-1])
    for axis, n in enumerate(names):
      if n in GROWN_AXES and width > 1:
        x = jnp.concatenate([x] * width, axis=axis)
        if n in INPUT_AXES.get(name, ()):
          x = x / width
    p = _path(path)
    if p[0] == "groups" and big.shape[0] > x.shape[0]:  # stacked layers: append identity layers
      new = big[x.shape[0]:]
      if name in OUTPUT_PROJECTIONS or (name in ("b", "active") and "experts" in p):
        new = jnp.zeros_like(new)
      x = jnp.concatenate([x, new], axis=0)
    if x.shape != big.shape:
      raise ValueError(f"cannot grow {'/'.join(map(str, p))}: {x.shape} vs student {big.shape}")
    return x.astype(big.dtype)

  return jax.tree_util.tree_map_with_path(grow, big_init)

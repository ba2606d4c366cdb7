"""Structural parameter addressing: what a parameter IS comes from its nnx variable type and
the metadata its owner modules tag it with, never from its path or its leaf name.

Variable types (all `nnx.Param`, so a checkpoint's layout does not depend on them):
  Param       a weight (weight decay applies)
  NoDecay     norm scales, biases, GDN decay gates: no weight decay
  ExpertFlag  a CMS expert slot's 0/1 activation flag: never trained, no decay

Metadata, set where a parameter is made (`layers.param`) or by the module that owns it
(`tag`):
  fan_in      logical axes the weight contracts over (its inputs); () for tables, scales,
              depthwise filters
  proj        which projection it is: "q", "k", "v", "o", "gate", "up", "down", "a", "b", ...
  out_proj    True on the output projection of a residual branch (zero = identity branch)
  layer_kind  the decoder layer's mixer ("gdn", "attn", "attn:sliding", ...)
  stacked     True on the decoder's layer parameters (leading "layers" axis)
  cms_level   index of the CMS level it belongs to (0 fastest); cms_part "norm" | "mlp" |
              "expert"; expert_slot the expert's slot within its level

`param_roles(model)` (or `roles_for(cfg)`, cached per model config) is a tree shaped like the
parameter dict (`nnx.to_pure_dict`) with one `Role` per leaf. Optimizer labels, the GDN
warm-up mask, seeding's expert edits and training labels, dreaming's forced experts and LoRA
targets are all questions asked of it, so they work on any architecture the decoder builds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx


class NoDecay(nnx.Param):
  """A parameter without weight decay (norm scales, biases, decay gates)."""


class ExpertFlag(NoDecay):
  """A CMS expert slot's activation flag (0 or 1): set by expansion, never by gradients."""


@dataclasses.dataclass(frozen=True)
class Role:
  """What one parameter is (a pytree leaf: not registered with jax)."""

  kind: type
  names: tuple = ()  # logical axis names (before stacking: no "layers" axis)
  stacked: bool = False  # has the decoder's leading "layers" axis (tagged by decoder.stacked)
  fan_in: tuple = ()
  proj: str | None = None
  out_proj: bool = False
  layer_kind: str | None = None
  cms_level: int | None = None
  cms_part: str | None = None
  expert_slot: int | None = None

  @property
  def decay(self) -> bool:
    return not issubclass(self.kind, NoDecay)

  @property
  def trainable(self) -> bool:
    return not issubclass(self.kind, ExpertFlag)

  @property
  def is_flag(self) -> bool:
    return issubclass(self.kind, ExpertFlag)

  @classmethod
  def of(cls, var: nnx.Variable) -> "Role":
    meta = var.get_metadata()
    names = tuple(meta.get("out_sharding") or ())
    if names and names[0] == "layers":  # the stacking axis (a scalar's metadata may lack it)
      names = names[1:]
    fields = {f.name for f in dataclasses.fields(cls)} - {"kind", "names"}
    return cls(kind=type(var), names=names,
               **{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta.items() if k in fields})


def tag(module: nnx.Module, **metadata) -> None:
  """Set metadata on every parameter under `module` (its owner says what they are)."""
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable):
      node.set_metadata(**metadata)


def param_roles(model: nnx.Module) -> dict:
  """The Role tree of a (possibly abstract) model, shaped like nnx.to_pure_dict of its state."""
  out: dict = {}
  for path, var in nnx.state(model).flat_state():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = Role.of(var)
  return out


_ROLES: dict = {}


def roles_for(cfg) -> dict:
  """The Role tree of cfg's model, traced abstractly once per model config."""
  from sleep_jax.models import model_factory

  key = (repr(cfg.model), int(cfg.sleep.chunk_len))
  if key not in _ROLES:
    _ROLES[key] = param_roles(nnx.eval_shape(lambda: model_factory(cfg)(nnx.Rngs(0))))
  return _ROLES[key]


# -- questions asked of a Role tree ------------------------------------------------------------
def is_role(x) -> bool:
  return isinstance(x, Role)


def labels(roles: dict, fn: Callable[[Role], Any]) -> dict:
  """fn(role) per parameter: a tree shaped like the parameters (optax masks and labels)."""
  return jax.tree.map(fn, roles, is_leaf=is_role)


def edit(params: dict, roles: dict, fn: Callable[[Role, Any], Any]) -> dict:
  """params with fn(role, leaf) applied to every leaf (fn returns the leaf to keep it)."""
  return jax.tree.map(lambda r, x: fn(r, x), roles, params, is_leaf=is_role)


def select(params: dict, roles: dict, pred: Callable[[Role], bool]) -> list[tuple[Role, Any]]:
  """(role, leaf) of every parameter whose role satisfies pred, in tree order."""
  pairs = jax.tree.leaves(jax.tree.map(lambda r, x: (r, x), roles, params, is_leaf=is_role),
                          is_leaf=lambda t: isinstance(t, tuple) and len(t) == 2 and is_role(t[0]))
  return [(r, x) for r, x in pairs if pred(r)]


def subtree(params: dict, roles: dict, pred: Callable[[Role], bool]) -> dict:
  """The nested dict of only those parameters whose role satisfies pred (same keys)."""
  out = {}
  for k, r in roles.items():
    if is_role(r):
      if pred(r):
        out[k] = params[k]
    else:
      sub = subtree(params[k], r, pred)
      if sub:
        out[k] = sub
  return out


def cms_levels(roles: dict) -> int:
  """Number of CMS levels (0 when the model has none)."""
  levels = [r.cms_level for r in jax.tree.leaves(roles, is_leaf=is_role) if r.cms_level is not None]
  return max(levels) + 1 if levels else 0


def expert_slots(roles: dict) -> int:
  """Expert slots per CMS level (0 when the model has none)."""
  slots = [r.expert_slot for r in jax.tree.leaves(roles, is_leaf=is_role) if r.expert_slot is not None]
  return max(slots) + 1 if slots else 0

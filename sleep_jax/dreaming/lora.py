"""LoRA adapters as pure pytrees over a model's parameter dict.

The adapted weights are chosen by their role (models/roles.py), not their names: by default
every projection whose `proj` is in TARGETS (attention and GDN queries/values, every MLP's
up and down projections, CMS levels included; not the CMS experts); `init(targets=...)`
takes any of models/adapters.ADAPTABLE. An adapter mirrors the parameter dict: at each
adapted weight W [layers, *in, *out] (its input axes are its role's fan_in) it holds
{"a": A [layers, prod(in), r], "b": B [layers, r, prod(out)]} with B = 0, so a fresh
adapter changes nothing. The delta of W is (alpha / r) A B reshaped to W.

Two ways to use one, mathematically equal:
* unmerged (`for_model`, the decoder's `adapters=`): x W + (x A)(s B), s = alpha / r. What
  training uses: gradients reach only A and B (no full-size dW of the frozen base), and a
  vmap over adapters with the base unbatched runs x W once for every copy's rows -- the
  isolated copies of dreaming, or several LoRA fine-tunes of one base;
* merged (`apply`): W + s A B, for export and for sampling many tokens with ONE adapter
  (merging once costs less than two extra products per projection per decoded token).
`hf/peft.py` writes an adapter in PEFT's format.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sleep_jax.models import roles
from sleep_jax.models.adapters import ADAPTABLE

TARGETS = ("q", "v", "up", "down")  # roles.Role.proj of the adapted projections


def is_target(r: roles.Role, targets: tuple = TARGETS) -> bool:
  """A stacked layer weight whose projection is one of `targets` (the default ones never
  name a CMS expert's factors, "a" / "b": experts are seeding's, not LoRA's)."""
  return r.proj in targets and r.stacked


def n_in(r: roles.Role) -> int:
  """How many leading axes (after the layers axis) a weight contracts over."""
  return max(len(r.fan_in), 1)


def init(params: dict, param_roles: dict, rng: jax.Array, rank: int, *, targets: tuple = TARGETS) -> dict:
  """A fresh adapter (B = 0) over every target weight of `params`."""
  bad = set(targets) - set(ADAPTABLE)
  if bad:
    raise ValueError(f"cannot adapt projections {sorted(bad)} (adaptable: {', '.join(ADAPTABLE)})")
  pairs = roles.select(params, param_roles, lambda r: is_target(r, targets))
  targets_tree = roles.subtree(params, param_roles, lambda r: is_target(r, targets))
  leaves, treedef = jax.tree.flatten(targets_tree)
  out = []
  for i, ((r, _), w) in enumerate(zip(pairs, leaves)):
    k = n_in(r)
    d_in, d_out = math.prod(w.shape[1:1 + k]), math.prod(w.shape[1 + k:])
    a = jax.random.normal(jax.random.fold_in(rng, i), (w.shape[0], d_in, rank), jnp.float32) * d_in ** -0.5
    out.append({"a": a, "b": jnp.zeros((w.shape[0], rank, d_out), jnp.float32)})
  return jax.tree.unflatten(treedef, out)


def _is_ab(t) -> bool:
  """One weight's factors (a CMS expert's own weights are also named "a" and "b": those
  are dicts of factors, not factors)."""
  return isinstance(t, dict) and set(t) == {"a", "b"} and not isinstance(t["a"], dict)


def for_model(lora: dict, *, alpha: float) -> dict:
  """The decoder's `adapters=` form: the LoRA scale alpha / r folded into B (pure)."""
  return jax.tree.map(lambda ab: {"a": ab["a"], "b": ab["b"] * (alpha / ab["a"].shape[-1])}, lora, is_leaf=_is_ab)


def apply(params: dict, lora: dict, *, alpha: float) -> dict:
  """Parameters with every adapter merged in (pure; the base `params` are untouched)."""
  def merged(w, ab):
    rank = ab["a"].shape[-1]
    delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"]).reshape(w.shape)
    return w + (alpha / rank) * delta.astype(w.dtype)

  def walk(p, ad):
    return {k: (walk(v, ad[k]) if isinstance(v, dict) else merged(v, ad[k])) if k in ad else v
            for k, v in p.items()}

  return walk(params, lora)

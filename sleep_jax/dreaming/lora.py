"""LoRA adapters as pure pytrees over a model's parameter dict.

The adapted weights are chosen by their role (models/roles.py), not their names: every
projection whose `proj` is in TARGETS (attention and GDN queries/values, every MLP's up and
down projections, CMS levels included), outside the CMS experts. An adapter mirrors the
parameter dict: at each adapted weight W [layers, d_in, *out] it holds
{"a": A [layers, d_in, r], "b": B [layers, r, prod(out)]} with B = 0 (so a fresh adapter
changes nothing); `apply` returns W + (alpha / r) * A @ B reshaped to W. Because adapters are
data, a batch of them (leading axis) can be trained at once with `jax.vmap`: the isolated
copies of dreaming share the base weights and differ only in their adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sleep_jax.models import roles

TARGETS = ("q", "v", "up", "down")  # roles.Role.proj of the adapted projections


def is_target(r: roles.Role) -> bool:
  return r.proj in TARGETS and r.cms_part != "expert" and r.stacked


def init(params: dict, param_roles: dict, rng: jax.Array, rank: int) -> dict:
  """A fresh adapter (B = 0) over every target weight of `params`."""
  targets = roles.subtree(params, param_roles, is_target)
  leaves, treedef = jax.tree.flatten(targets)
  out = []
  for i, w in enumerate(leaves):
    L, d_in = w.shape[:2]
    d_out = int(jnp.prod(jnp.array(w.shape[2:])))
    a = jax.random.normal(jax.random.fold_in(rng, i), (L, d_in, rank), jnp.float32) * d_in ** -0.5
    out.append({"a": a, "b": jnp.zeros((L, rank, d_out), jnp.float32)})
  return jax.tree.unflatten(treedef, out)


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

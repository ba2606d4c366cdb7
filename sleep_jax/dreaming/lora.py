"""LoRA adapters as pure pytrees over a model's parameter dict.

An adapter holds, for each adapted weight W [layers, d_in, *out] of the stacked blocks,
A [layers, d_in, r] and B [layers, r, prod(out)] with B = 0 (so a fresh adapter changes
nothing); `apply` returns W + (alpha / r) * A @ B reshaped to W. Because adapters are data,
a batch of them (leading axis) can be trained at once with `jax.vmap`: the isolated copies
of dreaming share the base weights and differ only in their adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TARGETS = ("wq", "wv", "w_up", "w_down")  # attention queries/values and every MLP level


def _targets(params: dict):
  out = {}
  for path, w in jax.tree_util.tree_flatten_with_path(params["groups"])[0]:
    name = getattr(path[-1], "key", None)
    if name in TARGETS and "experts" not in [getattr(k, "key", None) for k in path]:
      out[jax.tree_util.keystr(path)] = w
  return out


def init(params: dict, rng: jax.Array, rank: int) -> dict:
  lora = {}
  for i, (key, w) in enumerate(sorted(_targets(params).items())):
    L, d_in = w.shape[:2]
    d_out = int(jnp.prod(jnp.array(w.shape[2:])))
    a = jax.random.normal(jax.random.fold_in(rng, i), (L, d_in, rank), jnp.float32) * d_in ** -0.5
    lora[key] = {"a": a, "b": jnp.zeros((L, rank, d_out), jnp.float32)}
  return lora


def apply(params: dict, lora: dict, *, alpha: float) -> dict:
  """Parameters with every adapter merged in (pure; the base `params` are untouched)."""
  def merge(path, w):
    key = jax.tree_util.keystr(path[1:])  # path below "groups"
    if key not in lora:
      return w
    a, b = lora[key]["a"], lora[key]["b"]
    rank = a.shape[-1]
    delta = jnp.einsum("lir,lro->lio", a, b).reshape(w.shape)
    return w + (alpha / rank) * delta.astype(w.dtype)

  groups = jax.tree_util.tree_map_with_path(lambda p, w: merge((None, *p), w), params["groups"])
  return {**params, "groups": groups}

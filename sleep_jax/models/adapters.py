"""Unmerged low-rank adapters inside the decoder: `project` is every adapted projection.

    y = x W + (x A) B        A [d_in, r], B [r, d_out]  (d_in, d_out: W's input / output
                                                          axes flattened)

An adapter tree mirrors the parameter dict (`nnx.to_pure_dict`) at the weights it adapts:
{"groups": {p: {"attn": {"wq": {"a": A [R, d_in, r], "b": B [R, r, d_out]}}, ...}}}, with
the leading R axis of the stacked layers (models/decoder.py carries the slices of each
repeat through its scan beside the parameters). The decoder never scales: B already holds
whatever LoRA factor its library uses (dreaming/lora.py folds alpha / r into B).

Why unmerged: copies of a model that share the base weights and differ only in their
adapters (dreaming's isolated copies, multi-adapter serving) run `x W` as ONE matmul over
every copy's rows when vmapped with the base unbatched, and only the rank-r products per
copy; a merged W + A B is a full weight per copy, so each copy runs its own full matmul and
the gradient of a copy's loss goes through a full-size dW. Differentiating with respect to
the adapters alone, no dW of the frozen base is ever formed (XLA drops the unused half of
`dense`'s backward).

Where no adapter is given (`ad is None`), `project` is exactly the base einsum: models
without adapters run today's code, bit for bit.

Adaptable: every stacked projection that is a plain contraction of its input's trailing
axes with the weight's leading ones -- attention q, k, v, o and output gate, GDN q, k, v,
alpha, beta, output gate and o, every MLP's gate, up and down (CMS levels included) and the
CMS experts' a and b. Tables, norms, biases, convolutions and router vectors are not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sleep_jax.ops.dense import dense

# roles.Role.proj values that `project` serves (what an adapter may target).
ADAPTABLE = ("q", "k", "v", "o", "out_gate", "gate", "up", "down", "alpha", "beta", "a", "b")


def sub(ad: dict | None, *keys):
  """The adapter subtree at keys (None where nothing below is adapted)."""
  for k in keys:
    if ad is None:
      return None
    ad = ad.get(k)
  return ad


def _split_eq(eq: str) -> tuple[str, str]:
  """(lead, out_w) letters of a projection einsum "lead in, in out_w -> lead out_w"."""
  ins, out = eq.split("->")
  xs, ws = ins.split(",")
  contracted = [c for c in ws if c in xs and c not in out]
  lead, out_w = xs[:len(xs) - len(contracted)], ws[len(contracted):]
  if xs[len(lead):] != ws[:len(contracted)] or out != lead + out_w:
    raise ValueError(f"{eq!r} is not a projection of x's trailing axes by w's leading ones")
  return lead, out_w


def project(eq: str, x: jax.Array, w: jax.Array, ad: dict | None = None, *, plain: bool = False) -> jax.Array:
  """einsum(eq, x, w) + (x A) B reshaped to the output. plain: the base product is a plain
  jnp.einsum (where the model's own code used one), else `ops.dense`."""
  y = jnp.einsum(eq, x, w) if plain else dense(eq, x, w)
  if ad is None:
    return y
  lead, _ = _split_eq(eq)
  n = len(lead)
  x_NI = x.reshape(x.shape[:n] + (-1,))
  # Upper-case letters are free: the model's einsums use lower case only.
  xa_NR = dense(f"{lead}I,IR->{lead}R", x_NI, ad["a"].astype(x.dtype))
  xab_NO = dense(f"{lead}R,RO->{lead}O", xa_NR, ad["b"].astype(x.dtype))
  return y + xab_NO.reshape(y.shape).astype(y.dtype)

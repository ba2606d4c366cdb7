"""`dense(eq, x, w)`: an einsum whose backward pass materialises the cotangent first.

Why: on XLA:CPU the elementwise producer of a cotangent (the SwiGLU or softmax backward) is
fused with the transpose that the weight-gradient dot asks for, and that fused transposing
loop runs at a fraction of memory bandwidth: it cost ~25% of the transformer train step.
An optimization barrier on (input, cotangent) keeps both in row-major layout, so the two
backward matmuls read them directly (SwiGLU MLP fwd+bwd 0.33 -> ~0.9 of the jnp.dot peak). Other backends
fuse producers into their matmuls profitably, so there it is a plain einsum.

`eq` is a two-operand einsum "A,B->C" in which every index of A and B is either kept in C
or contracted between them (no index summed away inside one operand).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def dense(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
  if jax.default_backend() != "cpu":
    return jnp.einsum(eq, x, w)
  return _dense(eq, x, w)


def materialize(tree):
  """On CPU, compute `tree` once into buffers instead of letting XLA fuse (and so repeat) it
  into every consumer: e.g. RoPE's sin/cos [B, T, K/2] would be recomputed for each head of
  a [B, T, H, K] product inside a scanned layer. Elsewhere the identity."""
  if jax.default_backend() != "cpu":
    return tree
  return jax.lax.optimization_barrier(tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(eq, x, w):
  return jnp.einsum(eq, x, w)


def _dense_fwd(eq, x, w):
  return jnp.einsum(eq, x, w), (x, w)


def _dense_bwd(eq, res, dy):
  x, w = res
  ins, out = eq.split("->")
  a, b = ins.split(",")
  x, dy = jax.lax.optimization_barrier((x, dy))
  dx = jnp.einsum(f"{out},{b}->{a}", dy, w)
  dw = jnp.einsum(f"{a},{out}->{b}", x, dy)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)

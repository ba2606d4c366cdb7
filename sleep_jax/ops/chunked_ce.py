"""Per-token losses over a large vocabulary, a chunk of positions at a time.

A plain loss materialises float32 logits [B, T, V], and its backward a softmax and a
gradient of the same size: at V = 151,936 and T = 4096 that is 2.5 GB per buffer and row.
Here the head's matmul and the per-token loss run inside a `lax.scan` over chunks of C
positions: each chunk's logits [B, C, V] (float32) are reduced to per-token values and
dropped. The backward is a custom VJP that recomputes each chunk's logits, takes the
per-token function's VJP there, and adds the chunk's share into the head-weight gradient,
a float32 accumulator (a bf16 head would otherwise sum its gradient in bf16 chunk by chunk,
where the plain loss rounds once). Peak memory: a few [B, C, V] buffers and that
accumulator, instead of several [B, T, V] ones.

Chunks run along T with B kept, so a batch sharded over devices stays sharded: each device
reduces its own rows. T need not be a multiple of C (the tail is padded, its values cut).

The head is `x @ W` with x the final-normed features [B, T, D] and W either the unembedding
[D, V] or the tied embedding [V, D] (`tied`); the matmul runs in x's dtype (bf16 when the
model computes in bf16) and its result is cast to float32, exactly as `Decoder.head` does
(it calls `project`), so the chunked values equal the plain ones up to float rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# fn(logits_BCV float32, per-token inputs of the chunk, constants) -> (value_BC, aux):
# value is differentiated (w.r.t. the logits only); aux (any pytree of [B, C] arrays) is not.
DW_BLOCK = 4096  # vocabulary entries per block of the head-weight gradient (see _add_block_grads)

ChunkFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]


def project(x_BTD: jax.Array, w: jax.Array, tied: bool) -> jax.Array:
  """The head's matmul: float32 logits [..., V] from features [..., D]."""
  eq = "...d,vd->...v" if tied else "...d,dv->...v"
  return jnp.einsum(eq, x_BTD, w.astype(x_BTD.dtype)).astype(jnp.float32)


def _to_chunks(a_BT, C: int):
  """[B, T, ...] -> [K, B, C, ...] with T padded (zeros) up to K * C."""
  B, T = a_BT.shape[:2]
  K = -(-T // C)
  a = jnp.pad(a_BT, [(0, 0), (0, K * C - T)] + [(0, 0)] * (a_BT.ndim - 2))
  return jnp.moveaxis(a.reshape(B, K, C, *a_BT.shape[2:]), 1, 0)


def _from_chunks(a_KBC, T: int):
  K, B, C = a_KBC.shape[:3]
  return jnp.moveaxis(a_KBC, 0, 1).reshape(B, K * C, *a_KBC.shape[3:])[:, :T]


def _zero_cotangent(a):
  if jnp.issubdtype(a.dtype, jnp.inexact):
    return jnp.zeros(a.shape, a.dtype)
  return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_head(fn: ChunkFn, tied: bool, x_KBCD, w, tok_K, consts):
  def body(_, xs):
    x_BCD, tok = xs
    return None, fn(project(x_BCD, w, tied), tok, consts)

  return jax.lax.scan(body, None, (x_KBCD, tok_K))[1]


def _scan_head_fwd(fn, tied, x_KBCD, w, tok_K, consts):
  # Saved for the backward: the inputs only (no logits), as for a rematerialised chunk.
  return _scan_head(fn, tied, x_KBCD, w, tok_K, consts), (x_KBCD, w, tok_K, consts)


def _add_block_grads(dw_acc, dl_NV, x_ND, tied: bool, block: int):
  """dw_acc += the head-weight gradient of one chunk, `block` vocabulary entries at a time.

  One [V, D] product per chunk would be a second full-size buffer beside the accumulator
  (XLA:CPU does not fuse the add into the dot); per block it is [block, D], added in place
  with a dynamic_update_slice. The last block is shifted back to end at V, and its entries
  already added by the block before are zeroed, so V need not be a multiple of block."""
  V = dl_NV.shape[-1]
  block = min(block, V)
  axis = 0 if tied else 1  # tied: [V, D]; untied: [D, V]

  def one(j, acc):
    start = jnp.minimum(j * block, V - block)
    dl_Nb = jax.lax.dynamic_slice_in_dim(dl_NV, start, block, axis=1)
    dl_Nb = jnp.where(start + jnp.arange(block) >= j * block, dl_Nb, 0)
    eq = "nb,nd->bd" if tied else "nd,nb->db"
    part = jnp.einsum(eq, *((dl_Nb, x_ND) if tied else (x_ND, dl_Nb)), preferred_element_type=jnp.float32)
    old = jax.lax.dynamic_slice_in_dim(acc, start, block, axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(acc, old + part, start, axis=axis)

  return jax.lax.fori_loop(0, -(-V // block), one, dw_acc)


def _scan_head_bwd(fn, tied, res, cts):
  x_KBCD, w, tok_K, consts = res
  g_KBC = cts[0]
  D = x_KBCD.shape[-1]

  def body(dw_acc, xs):
    x_BCD, tok, g_BC = xs
    logits_BCV = project(x_BCD, w, tied)
    _, vjp = jax.vjp(lambda l: fn(l, tok, consts)[0], logits_BCV)
    # The cast back to x's dtype that `project`'s own VJP would apply.
    dl_BCV = vjp(g_BC.astype(jnp.float32))[0].astype(x_BCD.dtype)
    dx_BCD = jnp.einsum("bcv,vd->bcd" if tied else "bcv,dv->bcd", dl_BCV, w.astype(x_BCD.dtype))
    V = dl_BCV.shape[-1]
    dw_acc = _add_block_grads(dw_acc, dl_BCV.reshape(-1, V), x_BCD.reshape(-1, D), tied, DW_BLOCK)
    return dw_acc, dx_BCD

  dw, dx_KBCD = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (x_KBCD, tok_K, g_KBC))
  return (dx_KBCD, dw.astype(w.dtype), jax.tree.map(_zero_cotangent, tok_K), jax.tree.map(_zero_cotangent, consts))


_scan_head.defvjp(_scan_head_fwd, _scan_head_bwd)


def chunked_head_map(fn: ChunkFn, x_BTD: jax.Array, w: jax.Array, per_token: Any, consts: Any = (), *, tied: bool,
                     chunk: int) -> tuple[jax.Array, Any]:
  """fn over the head's logits, `chunk` positions at a time -> (value_BT, aux as [B, T]).

  per_token: a pytree of [B, T, ...] arrays that fn reads per chunk (targets, a teacher's
  features); consts: arrays fn reads whole (a teacher's head weight). Neither is
  differentiated. Gradients reach x and w through value only.
  """
  T = x_BTD.shape[1]
  tok_K = jax.tree.map(lambda a: _to_chunks(a, chunk), per_token)
  value_KBC, aux_K = _scan_head(fn, tied, _to_chunks(x_BTD, chunk), w, tok_K, consts)
  return _from_chunks(value_KBC, T), jax.tree.map(lambda a: _from_chunks(a, T), aux_K)


def _ce_fn(logits_BCV, targets_BC, _):
  ce_BC = optax.softmax_cross_entropy_with_integer_labels(logits_BCV, targets_BC)
  return ce_BC, jnp.argmax(logits_BCV, -1) == targets_BC


def chunked_cross_entropy(x_BTD: jax.Array, w: jax.Array, targets_BT: jax.Array, *, tied: bool,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
  """(ce_BT float32, correct_BT bool): softmax cross-entropy of the integer targets and
  whether the argmax hits them, as the plain float32 loss computes them from full logits."""
  return chunked_head_map(_ce_fn, x_BTD, w, targets_BT.astype(jnp.int32), tied=tied, chunk=chunk)


def chunked_divergence(div: Callable[[jax.Array, jax.Array], jax.Array], x_t_BTD: jax.Array, w_t: jax.Array,
                       x_s_BTD: jax.Array, w_s: jax.Array, *, tied_t: bool, tied_s: bool, chunk: int) -> jax.Array:
  """div(teacher_logits, student_logits) per position [B, T], both heads' logits computed a
  chunk at a time (the teacher's under stop_gradient, as in distill.token_divergence)."""
  def fn(s_logits_BCV, x_t_BCD, w_t):
    return div(project(x_t_BCD, w_t, tied_t), s_logits_BCV), ()

  return chunked_head_map(fn, x_s_BTD, w_s, jax.lax.stop_gradient(x_t_BTD), jax.lax.stop_gradient(w_t),
                          tied=tied_s, chunk=chunk)[0]

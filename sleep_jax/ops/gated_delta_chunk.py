"""Chunkwise-parallel gated delta rule with a hand-written backward pass.

Derivation (as in flash-linear-attention's chunk_gated_delta_rule). Write the update as
S_t = a_t S_{t-1} + d_t k_t^T with the "new value" d_t = b_t (v_t - a_t S_{t-1} k_t).
Within a chunk of C tokens starting from state S0, with g_i = sum_{s<=i} log a_s (<= 0),
gamma_i = exp(g_i) and decay ratios G_ij = exp(g_i - g_j) for j <= i:

    (I + A) D = b*V - (b*gamma*K) S0^T,       A_ij = b_i G_ij (k_i . k_j)  for j < i

so D = U - W S0^T with W = T (b*gamma*K), U = T (b*V), T = (I + A)^-1 (the UT / WY
transform), and with P_ij = G_ij (q_i . k_j) (j <= i) and Kd_i = exp(g_C - g_i) k_i:

    O = (gamma*Q) S0^T + P D ,      S_next = gamma_C S0 + D^T Kd .

Only D and S_next depend on the incoming state; everything else is batched matmuls over
many chunks. What makes this fast on XLA CPU (measured, 2 cores):
- The sequence is processed in groups of G chunks (a scan over groups): each group's
  intra-chunk work is batched over its G * batch * heads chunks, sized so that the
  [G, Y, C, C] intermediates stay in cache; on full-sequence arrays the same work ran
  2-3x slower. Groups are sliced from and written to the [B, T, H, *] arrays in place, so
  no full-size transposed copies exist.
- Only the state products run chunk by chunk (a short scan inside the group).
- The state is kept transposed, Z = S^T [K, V], and transposes of T, P, W, ... are taken
  explicitly in cache, so every product is a plain or right-transposed matmul: XLA CPU
  hands those to its fast batched-matmul library and runs left-transposed ones about 1.5x
  slower.
- The backward pass is written out: it recomputes a group's intra-chunk quantities from
  the inputs and the saved chunk states (autodiff would store or rebuild many more
  [C, C] arrays, and did the per-chunk weight gradients inside the reverse scan).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def _decay(g_NYC):
  """G_ij = exp(g_i - g_j) for j <= i, else 0. The exponent is masked *before* exp:
  above the diagonal g_i - g_j > 0 can overflow to inf (and inf * 0 = nan)."""
  C = g_NYC.shape[-1]
  return jnp.exp(jnp.where(jnp.tri(C, dtype=bool), g_NYC[..., :, None] - g_NYC[..., None, :], -jnp.inf))


def _strict_lower_blocks(A_XPP, b):
  """Blocks A[(2m+1)b + r, 2mb + c] for m < P/2b and r, c < b, as [X, P/2b, b, b].

  These are the L21 blocks of one level of the blocked inversion. They are strided through
  the flattened matrix (the block of pair m starts 2b(P+1) elements after that of m-1), so
  this is reshapes and static slices only: no gather.
  """
  X, P, _ = A_XPP.shape
  m = P // (2 * b)
  flat = A_XPP.reshape(X, P * P)[:, b * P:]
  flat = jnp.pad(flat, ((0, 0), (0, m * 2 * b * (P + 1) - flat.shape[1])))
  return flat.reshape(X, m, 2 * b * (P + 1))[:, :, : b * P].reshape(X, m, b, P)[..., :b]


def _bmm(x, y):
  """Batched x @ y over leading dims. Tiny matrices as multiply-and-sum: XLA CPU fuses
  that into one loop, while a dot_general over a huge batch of 2x2 .. 16x16 matrices runs
  matrix by matrix and is up to ten times slower."""
  if x.shape[-1] <= 16:
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)
  return jnp.einsum("...ij,...jk->...ik", x, y)


def unit_lower_inverse(A_XCC):
  """(I + A)^-1 for strictly lower triangular A, batched: [X, C, C] -> [X, C, C].

  Bottom-up blocked inversion: with L = [[L11, 0], [L21, L22]], L^-1 has diagonal blocks
  L11^-1, L22^-1 and off-diagonal block -L22^-1 L21 L11^-1. Starting from 1x1 blocks (the
  unit diagonal) and doubling the block size, each level is two batched products over all
  blocks of all chunks: log2(C) levels, about C^3/3 multiply-adds, no loop over rows.
  Not differentiated: the backward pass below reuses T.
  """
  X, C, _ = A_XCC.shape
  P = 1 << max(C - 1, 0).bit_length()  # pad to a power of two with identity rows
  A_XPP = jnp.pad(A_XCC, ((0, 0), (0, P - C), (0, P - C)))
  T_XMbb = jnp.ones((X, P, 1, 1), _F32)  # the M = P / b diagonal blocks of the inverse
  b = 1
  while b < P:
    m = P // (2 * b)
    T2 = T_XMbb.reshape(X, m, 2, b, b)
    T11, T22 = T2[:, :, 0], T2[:, :, 1]
    off = -_bmm(_bmm(T22, _strict_lower_blocks(A_XPP, b)), T11)
    top = jnp.concatenate([T11, jnp.zeros_like(T11)], axis=-1)
    bot = jnp.concatenate([off, T22], axis=-1)
    T_XMbb = jnp.concatenate([top, bot], axis=-2)
    b *= 2
  return T_XMbb.reshape(X, P, P)[:, :C, :C]


def _swap(x):
  return jnp.swapaxes(x, -1, -2)


def _intra(q, k, v, b, la):
  """The state-independent part, for a batch of chunks [..., C, *]."""
  C = q.shape[-2]
  # Cumulative log decay as a product with a triangular ones matrix: XLA CPU lowers cumsum
  # to a blocked reduce-window whose output layout slows every consumer fusion severalfold.
  g = jnp.einsum("...j,ij->...i", la, jnp.tri(C, dtype=_F32))
  G = _decay(g)
  P = jnp.einsum("...ik,...jk->...ij", q, k) * G
  A0 = jnp.einsum("...ik,...jk->...ij", k, k) * G * jnp.tri(C, k=-1, dtype=_F32)
  lead = A0.shape[:-2]
  T = unit_lower_inverse((b[..., None] * A0).reshape(-1, C, C)).reshape(*lead, C, C)
  W = jnp.einsum("...ij,...jk->...ik", T, (b * jnp.exp(g))[..., None] * k)
  U = jnp.einsum("...ij,...jv->...iv", T, b[..., None] * v)
  Kd = jnp.exp(g[..., -1:] - g)[..., None] * k
  return g, P, A0, T, W, U, Kd


def _load(x, m, G, C, Y):
  """Group m of x [B, T, H, *] (T = groups * G * C) in chunk layout [G, Y, C, *]."""
  B, L = x.shape[0], G * C
  x = lax.dynamic_slice_in_dim(x, m * L, L, axis=1).reshape(B, G, C, *x.shape[2:])
  x = jnp.moveaxis(x, 2, 3 if x.ndim > 4 else -1)  # [B, G, H, C, *]
  return jnp.swapaxes(x, 0, 1).reshape(G, Y, C, *x.shape[4:])


def _store(buf, x, m):
  """Write x [G, Y, C, *] as group m of buf [B, T, H, *]."""
  B, H = buf.shape[0], buf.shape[2]
  G, _, C = x.shape[:3]
  x = jnp.swapaxes(x.reshape(G, B, H, C, *x.shape[3:]), 0, 1)  # [B, G, H, C, *]
  x = jnp.moveaxis(x, 3, 2).reshape(B, G * C, *buf.shape[2:])
  return lax.dynamic_update_slice_in_dim(buf, x, m * G * C, axis=1)


def _forward(q, k, v, b, la, S_BHVK, C, G):
  B, T, H, K = q.shape
  V, Y, M = v.shape[-1], B * H, T // (G * C)

  def group(carry, m):
    Z, O_buf = carry
    q_, k_, v_, b_, la_ = (_load(x, m, G, C, Y) for x in (q, k, v, b, la))
    g, P, A0, T_, W, U, Kd = _intra(q_, k_, v_, b_, la_)

    def step(Z, xs):  # Z = S^T [Y, K, V]
      W_n, U_n, KdT_n, gC_n = xs
      D = U_n - jnp.einsum("yck,ykv->ycv", W_n, Z)
      return jnp.exp(gC_n)[:, None, None] * Z + jnp.einsum("ykc,ycv->ykv", KdT_n, D), (Z, D)

    Z, (Z0, D) = lax.scan(step, Z, (W, U, _swap(Kd), g[..., -1]), unroll=min(G, 8))
    O = jnp.einsum("gyck,gykv->gycv", jnp.exp(g)[..., None] * q_, Z0)
    O = O + jnp.einsum("gyij,gyjv->gyiv", P, D)
    return (Z, _store(O_buf, O, m)), Z0

  Z = _swap(S_BHVK).reshape(Y, K, V)
  (Z, O), Z0 = lax.scan(group, (Z, jnp.zeros((B, T, H, V), _F32)), jnp.arange(M))
  return (O, _swap(Z.reshape(B, H, K, V))), (q, k, v, b, la, Z0)


def _group_backward(q, k, v, b, la, Z0, dO, dZ):
  """Gradients for one group of chunks [G, Y, C, *]. Z0: the saved state entering each
  chunk; dZ: gradient w.r.t. the group's output state. Returns (dq, dk, dv, db, dla) and
  the gradient w.r.t. the group's input state."""
  C = q.shape[-2]
  g, P, A0, T, W, U, Kd = _intra(q, k, v, b, la)
  D = U - jnp.einsum("gyck,gykv->gycv", W, Z0)
  gam = jnp.exp(g)
  gC = g[..., -1]
  Qg = gam[..., None] * q

  # O = (gamma q) Z0 + P D
  dP = jnp.einsum("gyiv,gyjv->gyij", dO, D)
  dD = jnp.einsum("gyij,gyjv->gyiv", _swap(P), dO)
  dQg = jnp.einsum("gycv,gykv->gyck", dO, Z0)
  dZ0 = jnp.einsum("gykc,gycv->gykv", _swap(Qg), dO)

  # Reverse pass over the chunks: only the two state products live in it. dZ1 is the
  # gradient w.r.t. a chunk's output state.
  def step(dZ1, xs):
    dD_n, dZ0_n, Kd_n, WT_n, gC_n = xs
    dD_n = dD_n + jnp.einsum("yck,ykv->ycv", Kd_n, dZ1)
    dZ = jnp.exp(gC_n)[:, None, None] * dZ1 + dZ0_n - jnp.einsum("ykc,ycv->ykv", WT_n, dD_n)
    return dZ, (dZ1, dD_n)

  dZ, (dZ1, dD) = lax.scan(step, dZ, (dD, dZ0, Kd, _swap(W), gC), reverse=True,
                           unroll=min(q.shape[0], 8))
  dKd = jnp.einsum("gycv,gykv->gyck", D, dZ1)
  dW = -jnp.einsum("gycv,gykv->gyck", dD, Z0)
  h = jnp.sum(dKd * Kd, axis=-1)  # Kd_i = exp(g_C - g_i) k_i
  dgC = jnp.exp(gC) * jnp.sum(dZ1 * Z0, axis=(-2, -1)) + jnp.sum(h, axis=-1)

  # W = T (b gamma k), U = T (b v), T = (I + A)^-1:  dR = T^T dY, dA = -dR Y^T.
  TT = _swap(T)
  dR1 = jnp.einsum("gyij,gyjk->gyik", TT, dW)
  dR2 = jnp.einsum("gyij,gyjv->gyiv", TT, dD)
  dA = jnp.einsum("gyik,gyjk->gyij", dR1, W) + jnp.einsum("gyiv,gyjv->gyij", dR2, U)
  dA = -dA * jnp.tri(C, k=-1, dtype=_F32)

  # A = b_i A0, A0 = (k k^T) * G (strict);  P = (q k^T) * G.  G_ij = exp(g_i - g_j), so
  # a gradient dG_ij reaches g as dG_ij G_ij: + on row i, - on column j.
  G = _decay(g)
  E = dA * A0
  gradG = b[..., None] * E + dP * P
  dKK = b[..., None] * dA * G
  dQK = dP * G
  s1 = jnp.sum(dR1 * k, axis=-1)
  db = jnp.sum(E, axis=-1) + gam * s1 + jnp.sum(dR2 * v, axis=-1)
  dg = (jnp.sum(gradG, axis=-1) - jnp.sum(gradG, axis=-2)
        + b * gam * s1 + jnp.sum(dQg * Qg, axis=-1) - h)
  dg = dg.at[..., -1].add(dgC)

  dq = gam[..., None] * dQg + jnp.einsum("gyij,gyjk->gyik", dQK, k)
  dk = (jnp.einsum("gyij,gyjk->gyik", dKK + _swap(dKK), k)
        + jnp.einsum("gyij,gyjk->gyik", _swap(dQK), q)
        + (b * gam)[..., None] * dR1 + jnp.exp(gC[..., None] - g)[..., None] * dKd)
  dv = b[..., None] * dR2
  dla = jnp.einsum("gyi,ij->gyj", dg, jnp.tri(C, dtype=_F32))  # g = cumsum(la)
  return (dq, dk, dv, db, dla), dZ


def _backward(C, G, res, cotangents):
  q, k, v, b, la, Z0 = res
  dO, dS = cotangents
  B, T, H, K = q.shape
  V, Y = v.shape[-1], B * H

  def group(carry, xs):
    dZ, bufs = carry
    m, Z0_m = xs
    ins = tuple(_load(x, m, G, C, Y) for x in (q, k, v, b, la))
    grads, dZ = _group_backward(*ins, Z0_m, _load(dO, m, G, C, Y), dZ)
    return (dZ, tuple(_store(buf, d, m) for buf, d in zip(bufs, grads))), None

  bufs = tuple(jnp.zeros_like(x) for x in (q, k, v, b, la))
  dZ = _swap(dS).reshape(Y, K, V)
  (dZ, grads), _ = lax.scan(group, (dZ, bufs), (jnp.arange(T // (G * C)), Z0), reverse=True)
  return grads + (_swap(dZ.reshape(B, H, K, V)),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def chunk_gated_delta(q, k, v, b, la, S_BHVK, C, G):
  """(O [B, T, H, V], final S [B, H, V, K]) for q, k [B, T, H, K], v [B, T, H, V] and
  b = beta, la = log alpha [B, T, H], all float32, with chunks of C tokens in groups of G
  chunks; T must be a multiple of G * C (the caller pads)."""
  return _forward(q, k, v, b, la, S_BHVK, C, G)[0]


def _forward_rule(q, k, v, b, la, S_BHVK, C, G):
  return _forward(q, k, v, b, la, S_BHVK, C, G)


chunk_gated_delta.defvjp(_forward_rule, _backward)

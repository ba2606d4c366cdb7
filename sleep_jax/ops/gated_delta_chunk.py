"""Chunkwise-parallel gated delta rule with a hand-written backward pass.

Arrays here are in chunk layout: N chunks, Y = batch * heads, C tokens per chunk, so
q_NYCK is [N, Y, C, K]. See gated_delta.py for the public API and for the padding.

Derivation (as in flash-linear-attention's chunk_gated_delta_rule). Write the update as
S_t = a_t S_{t-1} + d_t k_t^T with the "new value" d_t = b_t (v_t - a_t S_{t-1} k_t).
Within a chunk starting from state S0, with g_i = sum_{s<=i} log a_s (<= 0), gamma_i =
exp(g_i) and decay ratios G_ij = exp(g_i - g_j) for j <= i:

    (I + A) D = b*V - (b*gamma*K) S0^T,       A_ij = b_i G_ij (k_i . k_j)  for j < i

so D = U - W S0^T with W = T (b*gamma*K), U = T (b*V), T = (I + A)^-1 (the UT / WY
transform), and with P_ij = G_ij (q_i . k_j) (j <= i) and Kd_i = exp(g_C - g_i) k_i:

    O = (gamma*Q) S0^T + P D ,      S_next = gamma_C S0 + D^T Kd .

Everything except the two state products is computed for all chunks at once in batched
matmuls (XLA CPU runs those well; it runs tiny per-step ops badly); only D and S_next go
through the scan over chunks. The backward pass is written out rather than left to
autodiff, which on XLA CPU materialises many more [C, C] intermediates and does the
per-chunk weight gradients inside the reverse scan as small matmuls.
"""

from __future__ import annotations

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


def _forward(q_NYCK, k_NYCK, v_NYCV, b_NYC, la_NYC, S_YVK):
  N, Y, C, K = q_NYCK.shape
  V = v_NYCV.shape[-1]
  # Cumulative log decay as a product with a triangular ones matrix: XLA CPU lowers cumsum
  # to a blocked reduce-window whose output layout slows every consumer fusion severalfold.
  g_NYC = jnp.einsum("nyj,ij->nyi", la_NYC, jnp.tri(C, dtype=_F32))
  gam_NYC = jnp.exp(g_NYC)
  G_NYCC = _decay(g_NYC)
  P_NYCC = jnp.einsum("nyik,nyjk->nyij", q_NYCK, k_NYCK) * G_NYCC
  A0_NYCC = jnp.einsum("nyik,nyjk->nyij", k_NYCK, k_NYCK) * G_NYCC * jnp.tri(C, k=-1, dtype=_F32)
  T_NYCC = unit_lower_inverse((b_NYC[..., None] * A0_NYCC).reshape(N * Y, C, C)).reshape(N, Y, C, C)
  W_NYCK = jnp.einsum("nyij,nyjk->nyik", T_NYCC, (b_NYC * gam_NYC)[..., None] * k_NYCK)
  U_NYCV = jnp.einsum("nyij,nyjv->nyiv", T_NYCC, b_NYC[..., None] * v_NYCV)
  gC_NY = g_NYC[..., -1]
  Kd_NYCK = jnp.exp(gC_NY[..., None] - g_NYC)[..., None] * k_NYCK

  def step(S, xs):
    W, U, Kd, gC = xs
    D = U - jnp.einsum("yck,yvk->ycv", W, S)
    return jnp.exp(gC)[:, None, None] * S + jnp.einsum("ycv,yck->yvk", D, Kd), (S, D)

  S_YVK, (S0_NYVK, D_NYCV) = lax.scan(step, S_YVK, (W_NYCK, U_NYCV, Kd_NYCK, gC_NY))
  O_NYCV = jnp.einsum("nyck,nyvk->nycv", gam_NYC[..., None] * q_NYCK, S0_NYVK)
  O_NYCV = O_NYCV + jnp.einsum("nyij,nyjv->nyiv", P_NYCC, D_NYCV)
  res = (q_NYCK, k_NYCK, v_NYCV, b_NYC, g_NYC, P_NYCC, A0_NYCC, T_NYCC, W_NYCK, U_NYCV,
         Kd_NYCK, S0_NYVK, D_NYCV)
  return (O_NYCV, S_YVK), res


def _backward(res, cotangents):
  q, k, v, b, g, P, A0, T, W, U, Kd, S0, D = res
  dO, dS_final = cotangents
  C = q.shape[-2]
  gam = jnp.exp(g)
  gC = g[..., -1]

  # O = (gamma q) S0^T + P D
  dP = jnp.einsum("nyiv,nyjv->nyij", dO, D)
  dD = jnp.einsum("nyij,nyiv->nyjv", P, dO)
  dQg = jnp.einsum("nycv,nyvk->nyck", dO, S0)
  dS0 = jnp.einsum("nycv,nyck->nyvk", dO, gam[..., None] * q)

  # Reverse scan over chunks; only the two state products live in it. dS1 is the
  # gradient w.r.t. the chunk's output state.
  def step(dS1, xs):
    dD_n, dS0_n, Kd_n, W_n, gC_n = xs
    dD_n = dD_n + jnp.einsum("yck,yvk->ycv", Kd_n, dS1)
    dS = jnp.exp(gC_n)[:, None, None] * dS1 + dS0_n - jnp.einsum("ycv,yck->yvk", dD_n, W_n)
    return dS, (dS1, dD_n)

  dS_init, (dS1, dD) = lax.scan(step, dS_final, (dD, dS0, Kd, W, gC), reverse=True)
  dKd = jnp.einsum("nycv,nyvk->nyck", D, dS1)
  dW = -jnp.einsum("nycv,nyvk->nyck", dD, S0)
  h = jnp.sum(dKd * Kd, axis=-1)  # Kd_i = exp(g_C - g_i) k_i
  dgC = jnp.exp(gC) * jnp.sum(dS1 * S0, axis=(-2, -1)) + jnp.sum(h, axis=-1)

  # W = T (b gamma k), U = T (b v), T = (I + A)^-1:  dR = T^T dY, dA = -dR Y^T.
  dR1 = jnp.einsum("nyji,nyjk->nyik", T, dW)
  dR2 = jnp.einsum("nyji,nyjv->nyiv", T, dD)
  dA = jnp.einsum("nyik,nyjk->nyij", dR1, W) + jnp.einsum("nyiv,nyjv->nyij", dR2, U)
  dA = -dA * jnp.tri(C, k=-1, dtype=_F32)

  # A = b_i A0, A0 = (k k^T) * G (strict);  P = (q k^T) * G.  G_ij = exp(g_i - g_j), so
  # a gradient dG_ij reaches g as dG_ij G_ij: + on row i, - on column j.
  Gd = _decay(g)
  E = dA * A0
  gradG = b[..., None] * E + dP * P
  dKK = b[..., None] * dA * Gd
  dQK = dP * Gd
  s1 = jnp.sum(dR1 * k, axis=-1)
  db = jnp.sum(E, axis=-1) + gam * s1 + jnp.sum(dR2 * v, axis=-1)
  dg = (jnp.sum(gradG, axis=-1) - jnp.sum(gradG, axis=-2)
        + b * gam * s1 + gam * jnp.sum(dQg * q, axis=-1) - h)
  dg = dg.at[..., -1].add(dgC)

  dq = gam[..., None] * dQg + jnp.einsum("nyij,nyjk->nyik", dQK, k)
  dk = (jnp.einsum("nyij,nyjk->nyik", dKK + jnp.swapaxes(dKK, -1, -2), k)
        + jnp.einsum("nyji,nyjk->nyik", dQK, q)
        + (b * gam)[..., None] * dR1 + jnp.exp(gC[..., None] - g)[..., None] * dKd)
  dv = b[..., None] * dR2
  dla = jnp.einsum("nyi,ij->nyj", dg, jnp.tri(C, dtype=_F32))  # g = cumsum(la)
  return dq, dk, dv, db, dla, dS_init


@jax.custom_vjp
def chunk_gated_delta(q_NYCK, k_NYCK, v_NYCV, b_NYC, la_NYC, S_YVK):
  """(O_NYCV, final S_YVK) of the gated delta rule in chunk layout; la = log alpha."""
  return _forward(q_NYCK, k_NYCK, v_NYCV, b_NYC, la_NYC, S_YVK)[0]


chunk_gated_delta.defvjp(_forward, _backward)

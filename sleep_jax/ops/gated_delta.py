"""The gated delta rule (Gated DeltaNet), recurrent and chunkwise-parallel.

    S_t = alpha_t * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T ,    o_t = S_t q_t

S is [V, K] per head. alpha (the decay itself, not its log) and beta are given by the
caller, as are already-normalised q and k: nothing is gated or normalised here. All math
runs in float32; outputs are cast back to v's dtype and the state stays float32.

Chunkwise form (as in flash-linear-attention's chunk_gated_delta_rule). Write the update
as S_t = a_t S_{t-1} + d_t k_t^T with the "new value" d_t = b_t (v_t - a_t S_{t-1} k_t).
Within a chunk of C tokens starting from state S0, with g_t = sum_{s<=t} log a_s,
gamma_t = exp(g_t) and decay ratios r_tj = exp(g_t - g_j):

    (I + A) D = b*V - (b*gamma*K) S0^T,    A_tj = b_t r_tj (k_t . k_j)  for j < t,

so D = U - W S0^T with U = T (b*V), W = T (b*gamma*K), T = (I + A)^-1 (the UT / WY
transform). Then, with P_tj = r_tj (q_t . k_j) for j <= t and Kd_j = r_Cj k_j,

    O    = (gamma*Q - P W) S0^T + P U
    S_C  = S0 (gamma_C I - W^T Kd) + U^T Kd  =:  S0 M + N.

Everything except S0 is known per chunk before the scan, so all of it (T, W, U, P, M, N)
is computed for every chunk at once in large batched matmuls; the scan over chunks is
just S <- S M + N (one [V,K]x[K,K] product per chunk), and the S0-dependent part of O is
one more batched matmul after the scan. This is what makes it fast on XLA CPU, where
per-iteration scan overhead and tiny dots dominate otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


def gated_delta_step(S_BHVK, q_BHK, k_BHK, v_BHV, alpha_BH, beta_BH):
  """One token of the recurrence: returns (o_BHV, new S_BHVK), all float32."""
  S_BHVK = S_BHVK.astype(_F32)
  q_BHK, k_BHK, v_BHV = (x.astype(_F32) for x in (q_BHK, k_BHK, v_BHV))
  a_BH11 = alpha_BH.astype(_F32)[..., None, None]
  b_BH1 = beta_BH.astype(_F32)[..., None]
  # alpha S (I - b k k^T) + b v k^T  ==  alpha S + (b (v - alpha S k)) k^T: rank-one update,
  # never forms the [K, K] matrix.
  Sk_BHV = jnp.einsum("bhvk,bhk->bhv", S_BHVK, k_BHK)
  d_BHV = b_BH1 * (v_BHV - a_BH11[..., 0] * Sk_BHV)
  S_BHVK = a_BH11 * S_BHVK + d_BHV[..., :, None] * k_BHK[..., None, :]
  o_BHV = jnp.einsum("bhvk,bhk->bhv", S_BHVK, q_BHK)
  return o_BHV, S_BHVK


def _recurrent(q_BTHK, k_BTHK, v_BTHV, a_BTH, b_BTH, S_BHVK):
  def step(S, xs):
    o, S = gated_delta_step(S, *xs)
    return S, o

  # Scan wants time leading.
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_BTHK, k_BTHK, v_BTHV, a_BTH, b_BTH))
  S_BHVK, o_TBHV = lax.scan(step, S_BHVK, xs)
  return jnp.moveaxis(o_TBHV, 0, 1), S_BHVK


def _strict_lower_blocks(A_XPP, b):
  """Blocks A[(2m+1)b + r, 2mb + c] for m < P/2b and r, c < b, as [X, P/2b, b, b].

  These are the L21 blocks of the level-b step below. Strided through the flattened
  matrix (the block for pair m starts 2b(P+1) elements after the one for m-1), so it is
  reshapes and static slices only: no gather.
  """
  X, P, _ = A_XPP.shape
  m = P // (2 * b)
  flat = A_XPP.reshape(X, P * P)[:, b * P:]
  flat = jnp.pad(flat, ((0, 0), (0, m * 2 * b * (P + 1) - flat.shape[1])))
  return flat.reshape(X, m, 2 * b * (P + 1))[:, :, : b * P].reshape(X, m, b, P)[..., :b]


def _bmm(x, y):
  """Batched x @ y over leading dims. Tiny matrices as multiply-and-sum: XLA CPU fuses that
  into one loop, while a dot_general with a huge batch of 2x2 .. 16x16 matrices is run
  matrix by matrix and is ten times slower."""
  if x.shape[-1] <= 16:
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)
  return jnp.einsum("...ij,...jk->...ik", x, y)


@jax.custom_vjp
def _unit_lower_inverse(A_XCC):
  """(I + A)^-1 for strictly lower triangular A, batched: [X, C, C] -> [X, C, C].

  Bottom-up blocked inversion: with L = [[L11, 0], [L21, L22]], L^-1 has diagonal blocks
  L11^-1, L22^-1 and off-diagonal block -L22^-1 L21 L11^-1. Starting from 1x1 blocks (the
  unit diagonal) and doubling the block size, each level is two batched products over all
  blocks of all chunks: log2(C) levels and about C^3/3 multiply-adds, no loop over rows.
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


def _unit_lower_inverse_fwd(A_XCC):
  T_XCC = _unit_lower_inverse(A_XCC)
  return T_XCC, T_XCC


def _unit_lower_inverse_bwd(T_XCC, dT_XCC):
  # T = L^-1  =>  dL = -T^T dT T^T, of which only the strictly lower part belongs to A.
  # Two large matmuls, instead of differentiating the blocked inversion level by level
  # (tiny ops that XLA CPU runs very slowly).
  C = T_XCC.shape[-1]
  dA_XCC = -jnp.einsum("xji,xjk,xlk->xil", T_XCC, dT_XCC, T_XCC)
  return (dA_XCC * jnp.tri(C, k=-1, dtype=_F32),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _chunked(q_BTHK, k_BTHK, v_BTHV, a_BTH, b_BTH, S_BHVK, C):
  B, T, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  N = -(-T // C)
  pad = N * C - T

  # Layout [N, B, H, C, *]: one transpose up front, then every per-chunk product is a
  # batched dot over the leading (N, B, H) dims with contiguous [C, *] operands, and the
  # scan over chunks slices its leading axis.
  def to_chunks(x):
    if pad:  # zeros: k = q = v = 0, beta = 0 and log alpha = 0, i.e. alpha = 1
      x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, N, C, H, *x.shape[3:])
    return jnp.transpose(x, (1, 0, 3, 2) + tuple(range(4, x.ndim)))

  q = to_chunks(q_BTHK)  # [N,B,H,C,K]
  k = to_chunks(k_BTHK)
  v = to_chunks(v_BTHV)
  bt = to_chunks(b_BTH)  # [N,B,H,C]
  g = jnp.cumsum(to_chunks(jnp.log(a_BTH)), axis=-1)  # log decay since chunk start, <= 0
  gC = g[..., -1:]  # [N,B,H,1]

  # Decay ratios exp(g_i - g_j) for j <= i. The exponent is masked *before* exp: above the
  # diagonal g_i - g_j > 0 can overflow to inf, and inf * 0 would poison the gradient.
  decay = jnp.exp(jnp.where(jnp.tri(C, dtype=bool), g[..., :, None] - g[..., None, :], -jnp.inf))
  # q k^T and k k^T in one product.
  QK_KK = jnp.einsum("nbhik,nbhjk->nbhij", jnp.concatenate([q, k], axis=-2), k)
  P_ = QK_KK[..., :C, :] * decay
  A = QK_KK[..., C:, :] * decay * (bt[..., :, None] * jnp.tri(C, k=-1, dtype=_F32))
  T_ = _unit_lower_inverse(A.reshape(-1, C, C)).reshape(N, B, H, C, C)
  W = jnp.einsum("nbhij,nbhjk->nbhik", T_, (bt * jnp.exp(g))[..., None] * k)
  U = jnp.einsum("nbhij,nbhjv->nbhiv", T_, bt[..., None] * v)
  Kdec = jnp.exp(gC - g)[..., None] * k

  # Only this depends on the incoming state: the new values D = U - W S0^T and the
  # chunk's final state gamma_C S0 + D^T Kdec.
  def step(S, xs):
    W_, U_, Kd_, gC_ = xs
    D = U_ - jnp.einsum("bhck,bhvk->bhcv", W_, S)
    S_next = jnp.exp(gC_)[..., None] * S + jnp.einsum("bhcv,bhck->bhvk", D, Kd_)
    return S_next, (S, D)

  S_final, (S0, D) = lax.scan(step, S_BHVK, (W, U, Kdec, gC))
  O = jnp.einsum("nbhck,nbhvk->nbhcv", jnp.exp(g)[..., None] * q, S0)
  O = O + jnp.einsum("nbhij,nbhjv->nbhiv", P_, D)  # [N,B,H,C,V]
  O = jnp.transpose(O, (1, 0, 3, 2, 4)).reshape(B, N * C, H, V)[:, :T]
  return O, S_final


def gated_delta_rule(q, k, v, alpha, beta, *, initial_state=None, mode="chunk", chunk_size=64):
  """Gated delta rule over a sequence.

  q, k: [B, T, H, K]; v: [B, T, H, V]; alpha, beta: [B, T, H] in (0, 1);
  initial_state: [B, H, V, K] or None (zeros). Returns (o [B, T, H, V] in v's dtype,
  final_state [B, H, V, K] float32). mode "recurrent" scans token by token;
  "chunk" is the chunkwise-parallel form with chunks of `chunk_size` tokens (any T).
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  if k.shape != q.shape or v.shape[:3] != (B, T, H):
    raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
  if alpha.shape != (B, T, H) or beta.shape != (B, T, H):
    raise ValueError(f"alpha {alpha.shape} and beta {beta.shape} must be {(B, T, H)}")
  if initial_state is None:
    S = jnp.zeros((B, H, V, K), _F32)
  else:
    if initial_state.shape != (B, H, V, K):
      raise ValueError(f"initial_state {initial_state.shape} must be {(B, H, V, K)}")
    S = initial_state.astype(_F32)
  args = tuple(x.astype(_F32) for x in (q, k, v, alpha, beta))
  if mode == "recurrent":
    o, S = _recurrent(*args, S)
  elif mode == "chunk":
    if chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    o, S = _chunked(*args, S, int(chunk_size))
  else:
    raise ValueError(f"mode must be 'chunk' or 'recurrent', got {mode!r}")
  return o.astype(v.dtype), S

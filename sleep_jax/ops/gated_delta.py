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


def _unit_lower_inverse(g_XC, b_XC, k_XCK):
  """T = (I + A)^-1 for A_tj = b_t exp(g_t - g_j) (k_t . k_j), j < t.  Returns [X, C, C].

  Bottom-up blocked inversion: with L = [[L11, 0], [L21, L22]], L^-1 has diagonal blocks
  L11^-1, L22^-1 and off-diagonal block -L22^-1 L21 L11^-1. Starting from 1x1 blocks
  (the unit diagonal) and doubling the block size, every level is a few batched matmuls
  over all blocks of all chunks: log2(C) levels, about C^3/3 multiply-adds, no sequential
  loop over rows. The L21 blocks are built directly from k, g and b (they lie strictly
  below the diagonal, so g_t - g_j <= 0 and exp needs no mask).
  """
  X, C = b_XC.shape
  P = 1 << max(C - 1, 0).bit_length()  # next power of two; padding rows have b = k = 0
  if P != C:
    pad = P - C
    g_XC = jnp.pad(g_XC, ((0, 0), (0, pad)))
    b_XC = jnp.pad(b_XC, ((0, 0), (0, pad)))
    k_XCK = jnp.pad(k_XCK, ((0, 0), (0, pad), (0, 0)))
  Kd = k_XCK.shape[-1]
  T_XMbb = jnp.ones((X, P, 1, 1), _F32)  # M = P / b diagonal blocks of size b
  b = 1
  while b < P:
    m = P // (2 * b)
    g2 = g_XC.reshape(X, m, 2, b)
    k2 = k_XCK.reshape(X, m, 2, b, Kd)
    b_hi = b_XC.reshape(X, m, 2, b)[:, :, 1]
    # L21[r, c] = b_r exp(g_r - g_c) k_r . k_c, r in the upper half, c in the lower half.
    L21 = jnp.einsum("xmrk,xmck->xmrc", k2[:, :, 1], k2[:, :, 0])
    L21 = L21 * b_hi[..., None] * jnp.exp(g2[:, :, 1, :, None] - g2[:, :, 0, None, :])
    T2 = T_XMbb.reshape(X, m, 2, b, b)
    T11, T22 = T2[:, :, 0], T2[:, :, 1]
    off = -jnp.einsum("xmij,xmjk,xmkl->xmil", T22, L21, T11)
    top = jnp.concatenate([T11, jnp.zeros_like(T11)], axis=-1)
    bot = jnp.concatenate([off, T22], axis=-1)
    T_XMbb = jnp.concatenate([top, bot], axis=-2)
    b *= 2
  return T_XMbb.reshape(X, P, P)[:, :C, :C]


def _chunked(q_BTHK, k_BTHK, v_BTHV, a_BTH, b_BTH, S_BHVK, C):
  B, T, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  N = -(-T // C)
  pad = N * C - T
  # Layout [B, H, N, C, *]: one transpose up front so every per-chunk product below is a
  # batched dot over the leading (B, H, N) dims with contiguous [C, *] operands.
  def to_chunks(x, fill=0.0):
    x = jnp.moveaxis(x, 2, 1)  # [B, H, T, ...]
    if pad:
      widths = [(0, 0)] * x.ndim
      widths[2] = (0, pad)
      x = jnp.pad(x, widths, constant_values=fill)
    return x.reshape(B, H, N, C, *x.shape[3:])

  # Padding: log alpha = 0 (alpha = 1), beta = 0, k = q = v = 0: the state passes through
  # padding unchanged and padded outputs are cropped.
  q = to_chunks(q_BTHK)
  k = to_chunks(k_BTHK)
  v = to_chunks(v_BTHV)
  la = to_chunks(jnp.log(a_BTH))
  bt = to_chunks(b_BTH)

  g = jnp.cumsum(la, axis=-1)  # [B,H,N,C], log of the decay since the chunk start (<= 0)
  gamma = jnp.exp(g)
  gC = g[..., -1:]  # [B,H,N,1]

  T_ = _unit_lower_inverse(g.reshape(-1, C), bt.reshape(-1, C), k.reshape(-1, C, K))
  T_ = T_.reshape(B, H, N, C, C)
  # W and U in one product: T @ [b*gamma*K | b*V].
  rhs = jnp.concatenate([(bt * gamma)[..., None] * k, bt[..., None] * v], axis=-1)
  WU = jnp.einsum("bhnij,bhnjd->bhnid", T_, rhs)
  W, U = WU[..., :K], WU[..., K:]

  # Intra-chunk attention P_tj = exp(g_t - g_j) (q_t . k_j), j <= t. The exponent is
  # masked *before* exp: above the diagonal g_t - g_j > 0 can overflow to inf, and
  # inf * 0 would poison the gradient even though the value is masked.
  causal = jnp.tril(jnp.ones((C, C), bool))
  dg = jnp.where(causal, g[..., :, None] - g[..., None, :], -jnp.inf)
  P_ = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * jnp.exp(dg)
  PWU = jnp.einsum("bhnij,bhnjd->bhnid", P_, WU)
  Qe = gamma[..., None] * q - PWU[..., :K]  # multiplies S0^T
  O_intra = PWU[..., K:]

  # Chunk transition S_next = S0 M + N with M = gamma_C I - W^T Kd, N = U^T Kd.
  Kdec = jnp.exp(gC - g)[..., None] * k
  MN = jnp.einsum("bhncd,bhnck->bhndk", WU, Kdec)  # [B,H,N,K+V,K]
  M = jnp.exp(gC)[..., None] * jnp.eye(K, dtype=_F32) - MN[..., :K, :]
  Nn = MN[..., K:, :]

  def step(S, mn):
    M_, N_ = mn
    return jnp.einsum("bhvk,bhkj->bhvj", S, M_) + N_, S

  xs = (jnp.moveaxis(M, 2, 0), jnp.moveaxis(Nn, 2, 0))
  S_final, S0_NBHVK = lax.scan(step, S_BHVK, xs)
  O = O_intra + jnp.einsum("bhnck,nbhvk->bhncv", Qe, S0_NBHVK)
  O = O.reshape(B, H, N * C, V)[:, :, :T]
  return jnp.moveaxis(O, 1, 2), S_final


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

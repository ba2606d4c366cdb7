"""The gated delta rule (Gated DeltaNet), recurrent and chunkwise-parallel.

    S_t = alpha_t * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T ,    o_t = S_t q_t

S is [V, K] per head. alpha (the decay itself, not its log) and beta are given by the
caller, as are already-normalised q and k: nothing is gated or normalised here. All math
runs in float32; outputs are cast back to v's dtype and the state stays float32.

Chunkwise form: see gated_delta_chunk.py (UT / WY transform per chunk, batched over all
chunks, with a scan over chunks that carries only the state).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sleep_jax.ops.gated_delta_chunk import chunk_gated_delta

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


# Elements per [G, B, H, C, max(C, K, V)] float32 array of one group of chunks (see
# gated_delta_chunk.py): 1 MiB, so that a group's intermediates stay in cache (1 MiB L2
# per core and 32 MiB L3 on the 2-core dev machine). 2^17 and 2^19 measured no faster. Under batch
# or head sharding B, H are global sizes here, so per-device groups come out smaller.
_GROUP_ELEMENTS = 1 << 18


def _chunked(q_BTHK, k_BTHK, v_BTHV, a_BTH, b_BTH, S_BHVK, C):
  B, T, H, K = q_BTHK.shape
  V = v_BTHV.shape[-1]
  N = -(-T // C)
  M = -(-N // max(1, min(N, _GROUP_ELEMENTS // (B * H * C * max(C, K, V)))))  # groups
  G = -(-N // M)  # chunks per group, balanced so that padding stays under one group
  pad = M * G * C - T
  # log alpha floored at log(1e-30) ~ -69: an alpha that underflowed to exactly 0 would
  # give -inf - -inf = nan in the decay ratios; exp(-69) is as good as 0 for the state.
  la_BTH = jnp.log(jnp.maximum(a_BTH, 1e-30))
  # Padding: zeros, i.e. k = q = v = 0, beta = 0 and log alpha = 0 (alpha = 1): a no-op.
  xs = (q_BTHK, k_BTHK, v_BTHV, b_BTH, la_BTH)
  if pad:
    xs = tuple(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs)
  O_BTHV, S_BHVK = chunk_gated_delta(*xs, S_BHVK, C, G)
  return O_BTHV[:, :T], S_BHVK


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

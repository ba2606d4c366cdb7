"""Learning to Imitate: rewards for student completions of teacher dreams, and GRPO.

A dream d (a teacher sample) is cut at a random point; the student completes the prefix G
times (a group). Each completion d' gets

  r = gamma * r_sem + (1 - gamma) * r_abs
  r_abs = 1 - lev(d', d) / max(|d'|, |d|)   if lev(d', d) <= z0, else 0
  r_sem = 1 if the frozen judge says d' means the same as d, else 0

over the completed parts (the shared prefix would only inflate the similarity). The judge is
the frozen teacher itself, offline: d' is "the same" when the teacher finds it about as
likely as its own dream -- its mean log-probability per completed token is at least the
dream's minus `margin` nats. (A paraphrase-aware judge model would replace this on text.)

GRPO (group-relative policy optimisation, Shao et al. 2024), no value network:
  A_i = (r_i - mean_group r) / (std_group r + eps)
  loss = -mean_t min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + kl_coef * KL_k3(pi || ref)
with rho_t = exp(log pi - log pi_old) and the k3 estimator exp(ref - log pi) - (ref - log pi) - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sleep_jax import losses


def levenshtein(a_N: jax.Array, b_M: jax.Array, len_a: jax.Array, len_b: jax.Array) -> jax.Array:
  """Edit distance between a[:len_a] and b[:len_b] (insert, delete, substitute: cost 1).

  Row-by-row dynamic programme as a lax.scan (static shapes; vmap it for batches). Row i
  holds D[i, j] for j = 0..M; entries past len_b are carried but never read.
  """
  M = b_M.shape[0]
  j_M1 = jnp.arange(M + 1)

  def row(prev, i):
    sub = prev[:-1] + (a_N[i] != b_M).astype(jnp.int32)
    dele = prev[1:] + 1
    best = jnp.minimum(sub, dele)  # D[i+1, j+1] before insertions
    # Insertions run left to right: D[i+1, j+1] = min(best_j, D[i+1, j] + 1), a prefix-min scan.
    first = prev[0] + 1
    cur = jax.lax.associative_scan(jnp.minimum, jnp.concatenate([first[None], best]) - j_M1) + j_M1
    return jnp.where(i < len_a, cur, prev), None

  last, _ = jax.lax.scan(row, j_M1.astype(jnp.int32), jnp.arange(a_N.shape[0]))
  return last[len_b]


def imitation_reward(completion_BN, dream_BN, len_B, *, z0: int, r_sem_B, gamma: float):
  """(r, r_abs) [B] float32 for completions and dreams of equal length len_B."""
  lev_B = jax.vmap(levenshtein)(completion_BN, dream_BN, len_B, len_B)
  r_abs = jnp.where(lev_B <= z0, 1.0 - lev_B / jnp.maximum(len_B, 1), 0.0)
  return gamma * r_sem_B.astype(jnp.float32) + (1.0 - gamma) * r_abs, r_abs


def judge_same(teacher_lp_completion_B, teacher_lp_dream_B, margin: float) -> jax.Array:
  """r_sem: 1 where the frozen teacher rates the completion within `margin` nats/token of its dream."""
  return (teacher_lp_completion_B >= teacher_lp_dream_B - margin).astype(jnp.float32)


def group_advantages(rewards_BG: jax.Array, eps: float = 1e-6) -> jax.Array:
  mean = rewards_BG.mean(axis=-1, keepdims=True)
  std = rewards_BG.std(axis=-1, keepdims=True)
  return (rewards_BG - mean) / (std + eps)


def grpo_loss(logp_BT, logp_old_BT, logp_ref_BT, adv_B, mask_BT, *, clip_eps: float, kl_coef: float):
  """(loss, stats): the clipped surrogate (to minimise) + kl_coef * k3 KL, token means per
  sequence, then the batch mean."""
  ratio = jnp.exp(logp_BT - logp_old_BT)
  adv = adv_B[:, None]
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
  log_r = logp_ref_BT - logp_BT
  kl = jnp.exp(log_r) - log_r - 1.0
  per_seq = lambda x: losses.masked_row_mean(x, mask_BT)
  loss = jnp.mean(per_seq(-surrogate + kl_coef * kl))
  clipped = jnp.abs(ratio - 1.0) > clip_eps
  return loss, {"kl": jnp.mean(per_seq(kl)), "clip_frac": jnp.mean(per_seq(clipped.astype(jnp.float32)))}

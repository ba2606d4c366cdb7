"""Generalised (on-policy) distillation: token-level divergences between teacher and student.

  L = (1 - lambda) E_{(x,y)~D} F(T||S)(y|x) + lambda E_{x~D} E_{y~S(.|x)} F(T||S)(y|x)

F is computed per position over the whole vocabulary, in float32, from temperature-scaled
logits; the teacher is always under stop_gradient and sampled sequences carry no gradient
(the caller samples outside the differentiated function). Divergences, with p = teacher,
q = student:
  fkl   KL(p || q) = sum p (log p - log q)                     mode-covering
  rkl   KL(q || p) = sum q (log q - log p)                     mode-seeking
  jsd   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD's JSD(beta))
All three are >= 0 and exactly 0 when p == q.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def log_probs(logits_BTV: jax.Array, temperature: float = 1.0) -> jax.Array:
  return jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)


def _kl(logp_a, logp_b):
  return jnp.sum(jnp.exp(logp_a) * (logp_a - logp_b), axis=-1)


def token_divergence(teacher_logits_BTV, student_logits_BTV, kind: str, *, beta: float = 0.5,
                     temperature: float = 1.0) -> jax.Array:
  """F(T||S) per position [B, T] (float32)."""
  lp_t = log_probs(jax.lax.stop_gradient(teacher_logits_BTV), temperature)
  lp_s = log_probs(student_logits_BTV, temperature)
  if kind == "fkl":
    return _kl(lp_t, lp_s)
  if kind == "rkl":
    return _kl(lp_s, lp_t)
  if kind == "jsd":
    if beta <= 0.0 or beta >= 1.0:  # m equals one of the two: the divergence is 0
      return jnp.zeros(lp_t.shape[:-1], jnp.float32)
    lp_m = jnp.logaddexp(jnp.log(beta) + lp_t, jnp.log1p(-beta) + lp_s)
    return beta * _kl(lp_t, lp_m) + (1.0 - beta) * _kl(lp_s, lp_m)
  raise ValueError(f"unknown divergence {kind!r} (fkl | rkl | jsd)")


def sequence_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log q(target_t | prefix) per position [B, T] (float32)."""
  lp = log_probs(logits_BTV)
  return jnp.take_along_axis(lp, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]

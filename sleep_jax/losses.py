"""Masked token losses: the one place cross-entropy over a loss mask is computed.

Training (`Trainer`, through token_stats / chunked_token_stats), seeding (sft_step, the
distillation terms' masked means), dreaming (sft_loss, importance, probe losses) and the
long-context evaluation all call these, so "the loss on the answer tokens" means the same
thing everywhere: float32 softmax cross-entropy, summed over mask > 0 positions, divided by
the number of such positions (at least 1, so an all-masked batch has loss 0, not NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sleep_jax.ops.chunked_ce import chunked_cross_entropy


def token_ce(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Cross-entropy per position [B, T], in float32 whatever the logits' dtype."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def masked_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Mean of x over the positions where mask > 0 (mask may weight them: 0/1 or floats)."""
  mask = mask_BT.astype(jnp.float32)
  return jnp.sum(x_BT * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_row_mean(x_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """masked_mean of each row [B] (per-sequence token means: GRPO, a sequence's log-prob)."""
  mask = mask_BT.astype(jnp.float32)
  return jnp.sum(x_BT * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def masked_ce(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  return masked_mean(token_ce(logits_BTV, targets_BT), mask_BT)


def next_token(tokens_BT: jax.Array, mask_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(inputs, targets, target mask) of next-token prediction: the mask of a row is that of
  its tokens, so position t's loss counts iff token t + 1 is masked in."""
  return tokens_BT[:, :-1], tokens_BT[:, 1:], mask_BT[:, 1:]


def next_token_loss(model, tokens_BT: jax.Array, mask_BT: jax.Array, *, adapters=None) -> jax.Array:
  """Masked next-token cross-entropy of a decoder (`model(tokens) -> (logits, state)`);
  adapters: unmerged low-rank adapters in decoder form (models/adapters.py), or None."""
  inputs, targets, mask = next_token(tokens_BT, mask_BT)
  logits = model(inputs)[0] if adapters is None else model(inputs, adapters=adapters)[0]
  return masked_ce(logits, targets, mask)


# -- sums, for token-weighted means across micro-batches and eval batches -------------------
def stats_from_ce(ce_BT: jax.Array, hit_BT: jax.Array, mask_BT: jax.Array) -> dict[str, jax.Array]:
  """Masked sums (loss_sum / tokens is masked_mean(ce, mask)) and exact match per example."""
  mask = mask_BT.astype(jnp.float32)
  correct_BT = hit_BT.astype(jnp.float32) * mask
  n_answer_B = mask.sum(-1)
  return {
      "loss_sum": (ce_BT * mask).sum(),
      "tokens": mask.sum(),
      "correct_tokens": correct_BT.sum(),
      "exact_B": (correct_BT.sum(-1) == n_answer_B) & (n_answer_B > 0),
  }


def token_stats(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> dict[str, jax.Array]:
  """Masked cross-entropy sums and exact-match per example (float32 softmax)."""
  return stats_from_ce(token_ce(logits_BTV, targets_BT), jnp.argmax(logits_BTV, -1) == targets_BT, mask_BT)


def chunked_token_stats(model, x_BTD: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                        chunk: int) -> dict[str, jax.Array]:
  """token_stats from the head's input (`forward(..., features=True)`), the logits computed
  `chunk` positions at a time (ops/chunked_ce.py): equal to token_stats up to rounding."""
  w, tied = model.head_weight()
  ce_BT, correct_BT = chunked_cross_entropy(x_BTD, w, targets_BT, tied=tied, chunk=chunk)
  return stats_from_ce(ce_BT, correct_BT, mask_BT)

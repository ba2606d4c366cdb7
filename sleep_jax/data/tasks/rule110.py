"""Rule 110 rollout: predict the middle cell of K random strings after `steps` steps.

Layout (chunk_len = L >= W; the model's input positions are split into chunks of L):

  [string 0, PAD to L] [string 1, PAD to L] ... [string K-1, PAD to L]  ?  l0 l1 ... l(K-1)

Each string fills its own consolidation chunk, so under hard eviction the only way to
answer is to have rolled the automaton forward in the fast-weight state while sleeping.
The prediction part is one query token followed by the K labels in string order: the
query gives label 0 an input position inside the last chunk, and the rest are read in the
fixed string order, which keeps T = K*L + 1 + K (101 at paper scale, the paper's 96 state
tokens + 4 labels plus the query). One query token per string would add K-1 tokens and
say nothing the fixed order does not already say.
"""

from __future__ import annotations

import numpy as np

PAD, BIT0, BIT1, QUERY = 0, 1, 2, 3
VOCAB_SIZE = 4

DEFAULTS = {"K": 4, "W": 24, "steps": 32, "chunk_len": None}  # chunk_len None: W
DIFFICULTY = "steps"

# RULE[(left << 2) | (centre << 1) | right] is the next centre cell; 110 = 0b01101110.
RULE = np.array([(110 >> i) & 1 for i in range(8)], dtype=np.uint8)


def _chunk_len(W: int, chunk_len: int | None) -> int:
  return W if chunk_len is None else int(chunk_len)


def seq_len(K=DEFAULTS["K"], W=DEFAULTS["W"], steps=DEFAULTS["steps"], chunk_len=None) -> int:
  return K * _chunk_len(W, chunk_len) + 1 + K


def rollout(states: np.ndarray, steps: int) -> np.ndarray:
  """Rule 110 with periodic boundary, `steps` times, on the last axis of a 0/1 array."""
  s = np.asarray(states, dtype=np.uint8)
  for _ in range(steps):
    s = RULE[(np.roll(s, 1, axis=-1) << 2) | (s << 1) | np.roll(s, -1, axis=-1)]
  return s


def sample(rng: np.random.Generator, K=DEFAULTS["K"], W=DEFAULTS["W"], steps=DEFAULTS["steps"],
           chunk_len=None) -> dict:
  L = _chunk_len(W, chunk_len)
  if K < 1 or W < 3 or steps < 0:
    raise ValueError(f"rule110 needs K >= 1, W >= 3, steps >= 0 (got K={K}, W={W}, steps={steps})")
  if L < W or L < K:
    raise ValueError(f"rule110 chunk_len={L} must hold a string (W={W}) and the query part (K={K})")
  states = rng.integers(0, 2, size=(K, W), dtype=np.uint8)
  labels = rollout(states, steps)[:, W // 2]

  T = seq_len(K, W, steps, L)
  tokens = np.zeros(T, np.int32)
  loss_mask = np.zeros(T, np.int32)
  for i in range(K):
    tokens[i * L:i * L + W] = BIT0 + states[i]
  tokens[K * L] = QUERY
  tokens[K * L + 1:] = BIT0 + labels
  loss_mask[K * L + 1:] = 1
  return {"tokens": tokens, "loss_mask": loss_mask, "states": states, "steps": int(steps),
          "labels": labels, "difficulty": int(steps)}


def to_text(tokens, chunk_len: int | None = None) -> str:
  """Bits as 0/1 and PAD as '.', grouped per chunk if chunk_len is given; then '? labels'."""
  chars = {PAD: ".", BIT0: "0", BIT1: "1", QUERY: "?"}
  toks = [int(t) for t in np.asarray(tokens)]
  q = toks.index(QUERY) if QUERY in toks else len(toks)
  head = "".join(chars.get(t, f"<{t}>") for t in toks[:q])
  if chunk_len:
    head = " ".join(head[i:i + chunk_len] for i in range(0, len(head), chunk_len))
  tail = [chars.get(t, f"<{t}>") for t in toks[q:]]
  return " ".join([head] + tail) if head else " ".join(tail)

"""Synthetic sleep tasks with integer vocabularies (no tokenizer).

Every task module provides:
  VOCAB_SIZE: int                  token ids are in [0, VOCAB_SIZE); id 0 is PAD everywhere
  DEFAULTS: dict                   default options for `sample`
  DIFFICULTY: str                  name of the option that sets difficulty (e.g. "steps")
  sample(rng, **options) -> dict   `tokens` int32 [T], `loss_mask` int32 [T] plus the
                                   structured problem (see DESIGN.md)
  to_text(tokens) -> str           readable rendering for debugging

Token layout convention shared with the model: the model reads tokens[:-1] and predicts
tokens[1:]; loss_mask[t] = 1 marks token t as an answer token to be predicted. Sleep chunks
are taken over the input positions, so every consolidation chunk's targets have loss 0.

Train and eval splits are disjoint by construction: an example belongs to the eval split
iff a hash of its tokens falls in the eval bucket, and `generate` rejection-samples until
the bucket matches the split requested.
"""

from __future__ import annotations

import hashlib
import importlib
from types import ModuleType
from typing import Any

import numpy as np

TASK_NAMES = ("rule110", "khop", "arith")
SPLITS = {"train": 0, "eval": 1}
EVAL_BUCKETS = 8  # 1 in 8 token sequences belongs to the eval split


class UnknownTaskError(ValueError):
  pass


def get_task(name: str) -> ModuleType:
  if name not in TASK_NAMES:
    raise UnknownTaskError(f"unknown task '{name}' (known: {', '.join(TASK_NAMES)})")
  return importlib.import_module(f"{__name__}.{name}")


def options_for(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
  """Task defaults merged with the given options; an unknown option is an error."""
  task = get_task(name)
  merged = dict(task.DEFAULTS)
  for k, v in (options or {}).items():
    if k not in task.DEFAULTS:
      raise UnknownTaskError(f"unknown option '{k}' for task '{name}' (known: {', '.join(task.DEFAULTS)})")
    merged[k] = v
  return merged


def words(tokens, word, pad: int = 0) -> list[str]:
  """`word(tok)` for each token, a run of n PAD tokens as one '_*n' (for `to_text`)."""
  out, pads = [], 0
  for tok in [int(t) for t in np.asarray(tokens)] + [None]:
    if tok == pad:
      pads += 1
      continue
    if pads:
      out.append(f"_*{pads}")
      pads = 0
    if tok is not None:
      out.append(word(tok))
  return out


def split_of(tokens: np.ndarray) -> str:
  digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int32).tobytes(), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") % EVAL_BUCKETS == 0 else "train"


def generate(name: str, split: str, index: int, seed: int, options: dict[str, Any] | None = None) -> dict:
  """Example `index` of `split`: a pure function of (task, split, index, seed, options)."""
  task = get_task(name)
  opts = options_for(name, options)
  for attempt in range(10_000):
    rng = np.random.default_rng([seed, SPLITS[split], index, attempt])
    ex = task.sample(rng, **opts)
    if split_of(ex["tokens"]) == split:
      return ex
  raise RuntimeError(f"task '{name}': could not draw a {split} example (problem space too small?)")

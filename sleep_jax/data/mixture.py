"""Mixtures of corpora: a weighted, shuffled, endless train stream with random access, and
the eval split.

Each corpus's windows are shuffled (epoch e of corpus i: a permutation seeded by its own
seed + e) and repeated; grain's MapDataset.mix interleaves the endless streams in fixed
proportion to the weights. Everything is index arithmetic, so example k of the mixture is
a pure function of (seed, k): the train iterator's strided slices, exact resume and any
process count work as for a single source.
"""

from __future__ import annotations

from typing import Sequence

import grain

from sleep_jax.data.builders import stable_hash


def shuffle_seed(seed: int, part: str | None = None) -> int:
  # grain permutes epoch e with seed + e, so plain seeds would make run seed=1 replay the
  # epoch-1 order of run seed=0; hashing the seed first decorrelates neighbouring seeds.
  key = ["shuffle", int(seed)] if part is None else ["shuffle", int(seed), part]
  return int(stable_hash(key, n=8), 16)


def train_mixture(sources: Sequence, weights: Sequence[float], names: Sequence[str], seed: int) -> grain.MapDataset:
  parts = [grain.MapDataset.source(s).shuffle(seed=shuffle_seed(seed, n)).repeat() for s, n in zip(sources, names)]
  if len(parts) == 1:
    return parts[0]
  total = float(sum(weights))
  return grain.MapDataset.mix(parts, [w / total for w in weights])


def eval_mixture(sources: Sequence, weights: Sequence[float], examples: int) -> grain.MapDataset:
  """Each corpus's first eval windows (in order), about `examples` in all, shared by weight."""
  total = float(sum(weights))
  parts = [grain.MapDataset.source(s)[:max(1, min(len(s), round(examples * w / total)))]
           for s, w in zip(sources, weights)]
  return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)

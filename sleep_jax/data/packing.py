"""Packing documents into fixed windows with positions and segment ids (concat-then-split).

Documents are laid end to end and the stream is cut every `seq_len` tokens. In a window,
segment ids number its pieces 1, 2, ... (0 is padding), positions restart at 0 in every
piece, and loss_mask is 0 on each piece's first token: that target would be predicted from
the previous document (split_batch pairs inputs[:, :-1] with targets[:, 1:]), and the model
resets S, conv caches and attention at every segment change, so nothing crosses documents.

A document cut at a window edge continues in the next window as a new segment whose
positions restart at 0 (RoPE is relative, so the piece differs from the uncut document only
by the context it lost, and no position ever exceeds seq_len). Only the last window of a
split is padded, so the efficiency (real tokens / window tokens) is 1 - O(seq_len / corpus).

pack=False puts each document in windows of its own (its last window padded), for ablations.

Packing runs once, at cache-build time, in document order; the windows are then shuffled
by the train pipeline, which keeps the stream a random-access function of (seed, step).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np


@dataclasses.dataclass
class PackStats:
  seq_len: int
  documents: int = 0
  tokens: int = 0  # real (non-padding) tokens written
  windows: int = 0
  cut_documents: int = 0  # documents spread over more than one window

  @property
  def efficiency(self) -> float:
    return self.tokens / max(1, self.windows * self.seq_len)

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "packing_efficiency": self.efficiency}


def pack(docs: Iterable[np.ndarray], seq_len: int, *, concat: bool = True,
         stats: PackStats | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Windows {"tokens", "loss_mask", "positions", "segment_ids"} (int32 [seq_len]) of the
  token arrays in `docs`, in order; `stats` (if given) is updated as windows are yielded."""
  L = int(seq_len)
  stats = stats if stats is not None else PackStats(L)

  def fresh():
    return {k: np.zeros(L, np.int32) for k in ("tokens", "loss_mask", "positions", "segment_ids")}

  win, n, seg = fresh(), 0, 0
  for ids in docs:
    ids = np.asarray(ids, np.int32)
    if ids.size == 0:
      continue
    stats.documents += 1
    stats.cut_documents += int(n + ids.size > L)
    while ids.size:
      take = min(L - n, ids.size)
      seg += 1
      win["tokens"][n:n + take] = ids[:take]
      win["positions"][n:n + take] = np.arange(take, dtype=np.int32)
      win["segment_ids"][n:n + take] = seg
      win["loss_mask"][n + 1:n + take] = 1  # the piece's first token is never a target
      n, ids = n + take, ids[take:]
      stats.tokens += take
      if n == L or (not concat and ids.size == 0):
        stats.windows += 1
        yield win
        win, n, seg = fresh(), 0, 0
  if n:
    stats.windows += 1
    yield win

"""A plain-text corpus as a TFDS dataset: byte-level tokens (vocab 256), fixed windows.

The file is cut into consecutive, non-overlapping windows of `data.seq_len` bytes (the
tail shorter than a window is dropped). The last `n_eval` windows form the eval split and
all earlier ones the train split, so the split is deterministic and the eval text never
appears in training. loss_mask is all 1 (every next byte is a target).

The dataset's identity hashes the file's contents (not its name or mtime), so editing the
corpus rebuilds it and copying it elsewhere does not.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from sleep_jax.data import builders

VOCAB_SIZE = 256
EVAL_FRACTION = 0.1  # eval gets at most this share of the windows


def content_hash(path: str) -> str:
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def split_sizes(num_bytes: int, seq_len: int, eval_examples: int) -> tuple[int, int]:
  """(train, eval) window counts: eval is the last min(eval_examples, 10%) windows, >= 1."""
  n = num_bytes // seq_len
  n_eval = max(1, min(int(eval_examples), int(n * EVAL_FRACTION)))
  return n - n_eval, n_eval


class TextConfig(tfds.core.BuilderConfig):

  def __init__(self, *, path: str, digest: str, seq_len: int, eval_examples: int):
    identity = dict(format=builders.FORMAT, digest=digest, seq_len=seq_len,
                    eval_examples=eval_examples)
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    super().__init__(name=f"{stem[:40] or 'text'}-{builders.stable_hash(identity)}",
                     version=builders.VERSION,
                     description=json.dumps({**identity, "path": path}, sort_keys=True))
    self.path, self.seq_len, self.eval_examples = path, seq_len, eval_examples


class SleepJaxText(tfds.core.GeneratorBasedBuilder):
  """Byte windows of one text file."""

  code_path = None  # see SleepJaxTask.code_path
  VERSION = tfds.core.Version(builders.VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return builders.make_info(self, "sleep_jax byte-level text: " + self.builder_config.description)

  def _split_generators(self, dl_manager):
    c = self.builder_config
    data = np.memmap(c.path, dtype=np.uint8, mode="r")  # no copy of a large corpus in RAM
    n_train, n_eval = split_sizes(data.size, c.seq_len, c.eval_examples)
    return {"train": self._generate_examples(data, 0, n_train, "train"),
            "eval": self._generate_examples(data, n_train, n_eval, "eval")}

  def _generate_examples(self, data, first: int, n: int, split: str):
    L = self.builder_config.seq_len
    ones = np.ones(L, np.int32)
    for i in builders.progress(range(n), n, f"text {split}"):
      w = first + i
      yield i, {"tokens": np.asarray(data[w * L:(w + 1) * L], np.int32), "loss_mask": ones,
                "difficulty": 0}


def text_builder(cfg, *, prepare: bool = True) -> SleepJaxText:
  path = cfg.text_path
  if not path:
    raise builders.DataError("data.text_path: not set (data.source=text needs a corpus file)")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise builders.DataError(f"data.text_path: no such file: {path}")
  size = os.path.getsize(path)
  if size // cfg.seq_len < 2:
    raise builders.DataError(f"data.text_path: {path} has {size} bytes, fewer than two windows "
                             f"of data.seq_len={cfg.seq_len}")
  config = TextConfig(path=path, digest=content_hash(path), seq_len=int(cfg.seq_len),
                      eval_examples=int(cfg.eval_examples))
  make = lambda: SleepJaxText(config=config, data_dir=builders.data_dir(cfg),
                              file_format="array_record")
  return builders.prepared(make) if prepare else builders.construct(make)

"""grain pipelines over the TFDS splits: a deterministic endless train stream, eval batches.

The train stream is defined globally, independent of how many processes read it:

  stream  = epoch 0 ++ epoch 1 ++ ...    epoch e = permutation of the train split, seeded
                                          by (seed, e) (grain's shuffle().repeat())
  batch s = stream[s*B : (s+1)*B]        B = global batch size
  process p of P gets rows [p*b, (p+1)*b) of batch s,  b = B // P

So `stream.batch(b)` has local batch s*P + p at that position, and a process reads the
strided slice [start_step*P + p :: P]. A resumed run, or one on another number of
processes, therefore sees exactly the same global batches. The iterator state is just the
step (plus what must not change under it: seed and global batch size).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Iterator, Optional

import grain
import numpy as np

from sleep_jax.data import mixture
from sleep_jax.data import tasks as tasks_lib
from sleep_jax.data import text as text_lib
from sleep_jax.data.builders import DataError, data_seed, task_builders, task_options

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  vocab_size: int  # token ids are in [0, vocab_size)
  example_len: int  # longest example T over both splits (<= data.seq_len, else an error)
  seq_len: int  # padded length of every batch row (data.seq_len)


def dataset_info(cfg) -> DataSpec:
  """Vocab size and example length of the configured data, without building anything."""
  if cfg.source == "text":
    return DataSpec(text_lib.VOCAB_SIZE, int(cfg.seq_len), int(cfg.seq_len))
  if cfg.source == "corpus":  # packed windows are exactly seq_len; the tokenizer sets the vocabulary
    from sleep_jax.data.tokenized import data_tokenizer

    return DataSpec(int(data_tokenizer(cfg).vocab_size), int(cfg.seq_len), int(cfg.seq_len))
  train, eval_ = task_options(cfg)
  task = tasks_lib.get_task(cfg.task)
  if hasattr(task, "seq_len"):
    T = max(task.seq_len(**train), task.seq_len(**eval_))
  else:  # tasks are not required to know T in advance: measure one example per split
    T = max(len(tasks_lib.generate(cfg.task, s, 0, data_seed(cfg), o)["tokens"])
            for s, o in (("train", train), ("eval", eval_)))
  return DataSpec(int(task.VOCAB_SIZE), int(T), int(cfg.seq_len))


def _check_fits(cfg, T: int) -> None:
  if T > cfg.seq_len:
    what = "text windows" if cfg.source == "text" else f"task '{cfg.task}' examples"
    raise DataError(f"data.seq_len={cfg.seq_len} is too short: {what} need {T} tokens")


def _builders(cfg, prepare: bool) -> dict[str, Any]:
  """{"train", "eval"} -> the builder holding that split (tasks: one per split; text: one)."""
  if cfg.source == "text":
    builder = text_lib.text_builder(cfg, prepare=prepare)
    return {"train": builder, "eval": builder}
  return task_builders(cfg, prepare=prepare)


def dataset_dir(cfg, split: str = "train") -> str:
  """Where the configured split lives (or will, once built; a mixture: its first corpus)."""
  if cfg.source == "corpus":
    from sleep_jax.data.tokenized import corpus_builders

    return str(corpus_builders(cfg, prepare=False)[0][1].data_path)
  return str(_builders(cfg, prepare=False)[split].data_path)


def data_sources(cfg) -> dict[str, Any]:
  """{"train", "eval"} random-access sources (decoded numpy dicts), building on first use.
  source=corpus: "train" is the list of the corpora's train sources (mixed by TrainIterator),
  "eval" their eval windows shared by weight (mixture.eval_mixture)."""
  _check_fits(cfg, dataset_info(cfg).example_len)
  if cfg.source == "corpus":
    from sleep_jax.data.tokenized import corpus_builders

    built = corpus_builders(cfg, prepare=True)
    weights = [c.weight for c in cfg.corpora]
    return {"train": [b.as_data_source("train") for _, b in built],
            "eval": mixture.eval_mixture([b.as_data_source("eval") for _, b in built], weights,
                                         int(cfg.eval_examples))}
  return {split: b.as_data_source(split) for split, b in _builders(cfg, prepare=True).items()}


def packing_report(cfg) -> dict[str, dict]:
  """{corpus name: {"train": PackStats dict, "eval": ...}} of the built corpora (source=corpus)."""
  from sleep_jax.data.tokenized import corpus_builders, pack_report

  return {c.name: pack_report(b) for c, b in corpus_builders(cfg, prepare=True)}


def _collate(examples, *, seq_len: int, eval_: bool = False) -> dict[str, np.ndarray]:
  """Right-pad to seq_len with token 0 / mask 0; None (eval padding) becomes an invalid row."""
  n = len(examples)
  keys = ["tokens", "loss_mask"]
  first = next((ex for ex in examples if ex is not None), None)
  if first is not None and "segment_ids" in first:  # packed text: where each document starts
    keys += ["positions", "segment_ids"]
  out = {k: np.zeros((n, seq_len), np.int32) for k in keys}
  if eval_:
    out["difficulty"] = np.zeros((n,), np.int32)
    out["valid"] = np.zeros((n,), bool)
  for i, ex in enumerate(examples):
    if ex is None:
      continue
    T = len(ex["tokens"])
    if T > seq_len:  # a variable-length task produced a longer example than it announced
      raise DataError(f"data.seq_len={seq_len} is too short: an example needs {T} tokens")
    for k in keys:
      out[k][i, :T] = ex[k]
    if eval_:
      out["difficulty"][i] = ex["difficulty"]
      out["valid"][i] = True
  return out


def _read_options(cfg) -> grain.ReadOptions:
  # Elements are whole local batches: `prefetch` threads each assemble one, and up to
  # `prefetch` finished batches wait in the buffer. 0 reads synchronously.
  n = max(0, int(cfg.prefetch))
  return grain.ReadOptions(num_threads=n, prefetch_buffer_size=n)


_shuffle_seed = mixture.shuffle_seed


class TrainIterator:
  """Iterator over this process's share of the global train batches, checkpointable."""

  def __init__(self, cfg, source, *, global_batch_size: int, seed: int, process_index: int,
               process_count: int, start_step: int):
    if global_batch_size < 1 or global_batch_size % process_count:
      raise DataError(f"train.batch_size: global batch {global_batch_size} must be a positive "
                      f"multiple of the process count {process_count}")
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} not in [0, {process_count})")
    if isinstance(source, (list, tuple)):  # source=corpus: one source per corpus, mixed by weight
      empty = [c for c, s in zip(cfg.corpora, source) if len(s) == 0]
      if empty:
        raise DataError(f"data.corpora: the train split of {empty[0].name or empty[0].path or empty[0].format} is empty")
    elif len(source) == 0:
      raise DataError("data.train_examples: the train split is empty")
    self._cfg, self._source = cfg, source
    self.global_batch_size, self.seed = int(global_batch_size), int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self._it = None
    self._start(int(start_step))

  def _start(self, step: int) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()  # stop the old prefetch threads before starting new ones
    P, p = self.process_count, self.process_index
    collate = functools.partial(_collate, seq_len=int(self._cfg.seq_len))
    if isinstance(self._source, (list, tuple)):
      from sleep_jax.data.corpus import corpus_name

      names = [corpus_name(c, i) for i, c in enumerate(self._cfg.corpora)]
      examples = mixture.train_mixture(self._source, [c.weight for c in self._cfg.corpora], names, self.seed)
    else:
      examples = grain.MapDataset.source(self._source).shuffle(seed=_shuffle_seed(self.seed)).repeat()
    ds = examples.batch(self.local_batch_size, batch_fn=collate)
    ds = ds[step * P + p::P]
    self._it = iter(ds.to_iter_dataset(_read_options(self._cfg)))
    self.step = step

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    """JSON-able; independent of process count, so it restores onto any number of hosts."""
    return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ("seed", "global_batch_size"):
      if key in state and int(state[key]) != getattr(self, key):
        raise DataError(f"data iterator state: saved {key}={state[key]} but this run uses "
                        f"{getattr(self, key)}; the batch stream would differ")
    self._start(int(state["step"]))

  def close(self) -> None:
    if hasattr(self._it, "close"):
      self._it.close()


def make_train_iterator(cfg, *, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0) -> TrainIterator:
  """Endless train batches {"tokens", "loss_mask"} (packed text also "positions",
  "segment_ids"): int32[global_batch_size // process_count, data.seq_len], the rows of global
  batch `step` that belong to `process_index`."""
  if cfg.source == "corpus":
    for name, report in packing_report(cfg).items():
      if report:
        t = report["train"]
        log.info("data %s: %d documents, %d tokens, %d windows of %d, packing efficiency %.4f", name,
                 t["documents"], t["tokens"], t["windows"], t["seq_len"], t["packing_efficiency"])
  return TrainIterator(cfg, data_sources(cfg)["train"], global_batch_size=global_batch_size,
                       seed=seed, process_index=process_index, process_count=process_count,
                       start_step=start_step)


def make_eval_batches(cfg, *, batch_size: int, num_batches: Optional[int] = None,
                      process_index: int = 0,
                      process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The eval split in index order, `batch_size` (global) examples per batch.

  Keys: tokens, loss_mask int32[b, seq_len], difficulty int32[b], valid bool[b] with
  b = batch_size // process_count. Rows past the end of the split (the last batch) are
  padding: mask 0, valid False. Every process yields the same number of batches.
  """
  if batch_size < 1 or batch_size % process_count:
    raise DataError(f"eval batch size {batch_size} must be a positive multiple of the "
                    f"process count {process_count}")
  source = data_sources(cfg)["eval"]
  n = len(source)
  total = -(-n // batch_size)
  if num_batches is not None:
    total = min(total, int(num_batches))
  P, p, b = process_count, process_index, batch_size // process_count
  ds = grain.MapDataset.source(source)
  pad = total * batch_size - n
  if pad > 0:  # None rows: collate turns them into mask-0, valid=False padding
    ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([None] * pad)])
  ds = ds[:total * batch_size].batch(b, batch_fn=functools.partial(
      _collate, seq_len=int(cfg.seq_len), eval_=True))[p::P]
  return iter(ds.to_iter_dataset(_read_options(cfg)))

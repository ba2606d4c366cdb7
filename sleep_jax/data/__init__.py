"""Data: synthetic tasks and text corpora as TFDS (array_record) datasets, read with grain.

  dataset_info(cfg) -> DataSpec(vocab_size, example_len, seq_len)      no building
  make_train_iterator(cfg, *, global_batch_size, seed, process_index=0, process_count=1,
                      start_step=0) -> TrainIterator (next / get_state / set_state)
  make_eval_batches(cfg, *, batch_size, num_batches=None) -> iterator of eval batches
  data_sources(cfg) -> {"train", "eval"} random-access sources (builds on first use)
  dataset_dir(cfg, split='train') -> str  that split's dataset directory, built or not
  packing_report(cfg) -> {corpus: {"train", "eval"} packing stats}   (data.source=corpus)

data.source: task (synthetic tasks), text (byte windows of one file), corpus (documents of
text / jsonl / tfds / stdlib corpora, tokenized, packed with positions and segment ids,
mixed by weight: corpus.py, tokenized.py, packing.py, mixture.py).

Every data problem raises `DataError` (a ValueError) with a one-line message.
"""

from sleep_jax.data.builders import DataError
from sleep_jax.data.pipeline import (DataSpec, TrainIterator, data_sources, dataset_dir,
                                     dataset_info, make_eval_batches, make_train_iterator, packing_report)

__all__ = ["DataError", "DataSpec", "TrainIterator", "data_sources", "dataset_dir", "dataset_info",
           "make_eval_batches", "make_train_iterator", "packing_report"]

"""TFDS builders for the synthetic tasks, written as array_record and read without TF.

`task_builders(cfg)` returns {"train": builder, "eval": builder}: one prepared
`tfds.core.GeneratorBasedBuilder` per split, whose split of that name holds
`generate(task, split, i, seed, options)` for i = 0..n-1 in index order. Each lives in

  <data_dir>/sleep_jax_task/<task>-<split>-<hash>/1.0.0/sleep_jax_task-<split>.array_record-*

where <hash> covers everything that split's records depend on (task, split, that split's
merged options, seed, that split's example count, FORMAT), so a changed setting never
reuses a stale build, and changing only eval options (a sweep's eval grid over
difficulties) rebuilds only the eval split, never the training set. Building the splits
separately costs nothing in disjointness: an example's split is decided by a hash of its
own tokens (`tasks.split_of`), not by which build it came from.

Why this works without TensorFlow: GeneratorBasedBuilder serialises examples with its
own protobuf code, the array_record writer is a C++ extension, and `as_data_source` reads
records back through array_record and decodes them with numpy. Nothing here may touch
`tf.data` (`as_dataset`), which is the only part that needs TF.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from sleep_jax.data import tasks as tasks_lib

# Bump when the record layout or the meaning of a field changes: every cached build is
# then rebuilt instead of being read with the wrong interpretation.
FORMAT = 1
VERSION = "1.0.0"


class _QuietCustomConfig(logging.Filter):
  # Every builder here uses a custom (hash-named) BuilderConfig by design; TFDS warns
  # about that on each construction, which would only be noise.
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_QuietCustomConfig())


class DataError(ValueError):
  """A data problem; the message is one line naming the config key or path at fault."""


def stable_hash(obj: Any, n: int = 12) -> str:
  """Short hash of a JSON-able object, independent of dict order and of the process."""
  blob = json.dumps(obj, sort_keys=True, default=str).encode()
  return hashlib.blake2b(blob, digest_size=16).hexdigest()[:n]


def features() -> tfds.features.FeaturesDict:
  # Raw-bytes encoding keeps int32 as int32 (tf.train.Example would upcast to int64 and
  # varint-encode) and decodes with a single np.frombuffer; shape None allows tasks whose
  # length differs between splits or examples.
  enc = tfds.features.Encoding.BYTES
  return tfds.features.FeaturesDict({
      "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=enc),
      "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=enc),
      "difficulty": tfds.features.Scalar(dtype=np.int32),
  })


def make_info(builder: tfds.core.DatasetBuilder, description: str) -> tfds.core.DatasetInfo:
  # disable_shuffling: records stay in key (= index) order, so record i is example i.
  # (DatasetInfo directly, not dataset_info_from_configs, which wants a package dir.)
  return tfds.core.DatasetInfo(builder=builder, description=description, features=features(),
                               disable_shuffling=True)


def progress(examples: Iterator[tuple[int, dict]], total: int, desc: str):
  return tqdm.tqdm(examples, total=total, desc=desc, unit=" ex", mininterval=1.0, leave=False)


# ---------------------------------------------------------------------------------------
# Task builder


class TaskConfig(tfds.core.BuilderConfig):
  """One split of one concrete task; its name carries the hash of what that split depends on."""

  def __init__(self, *, task: str, split: str, options: dict, seed: int, examples: int):
    # Only this split's inputs: the other split's options or size must not rename (and so
    # rebuild) this one.
    identity = dict(format=FORMAT, task=task, split=split, options=options, seed=seed, examples=examples)
    super().__init__(name=f"{task}-{split}-{stable_hash(identity)}", version=VERSION,
                     description=json.dumps(identity, sort_keys=True, default=str))
    self.task, self.split, self.seed = task, split, seed
    self.options, self.examples = options, examples


class SleepJaxTask(tfds.core.GeneratorBasedBuilder):
  """Examples of one split of one synthetic task (see `sleep_jax.data.tasks`)."""

  # No source dir of its own: without this TFDS looks for a checksums file beside the
  # module and, for a class inside a package, needs `importlib_resources` to do so.
  code_path = None
  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    return make_info(self, "sleep_jax synthetic task: " + self.builder_config.description)

  def _split_generators(self, dl_manager):
    c = self.builder_config
    try:  # bad option values surface here as one line, not deep inside the TFDS writer
      tasks_lib.generate(c.task, c.split, 0, c.seed, c.options)
    except (ValueError, TypeError) as e:
      key = "data.task_options" if c.split == "train" else "data.eval_task_options"
      raise DataError(f"{key}: {' '.join(str(e).split())}") from None
    return {c.split: self._generate_examples(c.split, c.examples, c.options)}

  def _generate_examples(self, split: str, n: int, options: dict):
    c = self.builder_config
    difficulty_key = getattr(tasks_lib.get_task(c.task), "DIFFICULTY", None)
    for i in progress(range(n), n, f"{c.task} {split}"):
      ex = tasks_lib.generate(c.task, split, i, c.seed, options)
      difficulty = ex.get("difficulty", options.get(difficulty_key, 0))
      yield i, {"tokens": np.asarray(ex["tokens"], np.int32),
                "loss_mask": np.asarray(ex["loss_mask"], np.int32),
                "difficulty": int(difficulty)}


def task_options(cfg) -> tuple[dict, dict]:
  """(train, eval) options of `cfg.task`, defaults merged; DataError on a bad task/option."""
  try:
    tasks_lib.get_task(cfg.task)
  except tasks_lib.UnknownTaskError as e:
    raise DataError(f"data.task: {e}") from None
  out = []
  for key, options in (("data.task_options", dict(cfg.task_options)),
                       ("data.eval_task_options", {**dict(cfg.task_options), **dict(cfg.eval_task_options)})):
    try:
      merged = tasks_lib.options_for(cfg.task, options)
    except tasks_lib.UnknownTaskError as e:
      raise DataError(f"{key}: {e}") from None
    _check_option_types(cfg.task, merged, key)
    out.append(merged)
  return out[0], out[1]


def _check_option_types(task: str, options: dict, key: str) -> None:
  """Each option has its default's type (None defaults: an int or None), so `n_nodes=2.5`
  or `hops=abc` is one line here rather than a traceback deep inside a generator."""
  defaults = tasks_lib.get_task(task).DEFAULTS
  for name, value in options.items():
    default = defaults[name]
    want = type(default) if default is not None else int
    ok = isinstance(value, (int, float) if want is float else want) and (want is bool or not isinstance(value, bool))
    if default is None and value is None:
      ok = True
    if not ok:
      kind = {int: "an integer", bool: "true or false", str: "a string", float: "a number"}.get(want, want.__name__)
      raise DataError(f"{key}.{name}: {value!r} is not {kind}" + (" (or null)" if default is None else ""))


def data_seed(cfg) -> int:
  # The dataset is fixed across training seeds (those only reshuffle it) unless the
  # config names a seed for the data itself.
  return int(getattr(cfg, "seed", 0) or 0)


def task_builders(cfg, *, prepare: bool = True) -> dict[str, SleepJaxTask]:
  """{"train", "eval"}: one builder per split, each named by its own inputs only."""
  train, eval_ = task_options(cfg)
  out = {}
  for split, options, n in (("train", train, cfg.train_examples), ("eval", eval_, cfg.eval_examples)):
    config = TaskConfig(task=cfg.task, split=split, options=options, seed=data_seed(cfg), examples=int(n))
    make = lambda config=config: SleepJaxTask(config=config, data_dir=data_dir(cfg), file_format="array_record")
    out[split] = prepared(make) if prepare else construct(make)
  return out


# ---------------------------------------------------------------------------------------
# Building: once, under a lock, with one progress bar


def data_dir(cfg) -> str:
  return os.path.abspath(os.path.expanduser(cfg.data_dir))


def is_built(builder: tfds.core.DatasetBuilder) -> bool:
  # TFDS writes dataset_info.json last and renames its incomplete dir into place, so a
  # version dir holding it is a finished build.
  return (builder.data_path / "dataset_info.json").exists()


@contextlib.contextmanager
def _file_lock(path: str):
  # flock, not a marker file: the lock dies with its process, so a crashed build never
  # leaves the others waiting forever.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _own_progress_bar():
  # Our generator shows one bar with a known total; TFDS's own per-split bars (unknown
  # totals) would only add noise, so they are muted for the duration of the build.
  utils = tfds.core.utils.tqdm_utils
  was = getattr(utils, "_active", True)
  utils.display_progress_bar(False)
  try:
    yield
  finally:
    utils.display_progress_bar(was)


def construct(make: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
  try:
    return make()
  except OSError as e:
    raise DataError(f"data.data_dir: cannot open dataset dir: {e}") from None


def prepared(make: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
  """A builder whose data exists on disk, building it first if no process has yet.

  Concurrent callers (several processes of one run, or runs sharing data_dir) serialise on
  a per-dataset file lock; whoever gets it second finds the build done and only reads.
  """
  builder = construct(make)
  # A builder reads dataset_info.json when constructed: one constructed while another
  # thread or process was still building has no splits even if the build is done now.
  if is_built(builder) and builder.info.splits:
    return builder
  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_path)))  # <data_dir>/<name>
  lock = os.path.join(root, f".{builder.builder_config.name}.lock")
  try:
    with _file_lock(lock):
      builder = make()  # fresh: another process may have finished while we waited
      if not is_built(builder):
        with _own_progress_bar():
          builder.download_and_prepare(file_format="array_record")
  except OSError as e:
    raise DataError(f"data.data_dir: cannot build dataset in {builder.data_path}: {e}") from None
  return make()  # re-read dataset_info.json so split sizes are known

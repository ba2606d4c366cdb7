"""Checks that run before anything is written to a run dir.

A command that fails here leaves the run dir as it was (no config.yaml, no lock file, no
directory), so the corrected command starts cleanly instead of being refused as "a
different config". Model shapes are checked by building the Trainer (abstract, nothing
allocated) before the run dir is touched; here: data, vocabulary, mesh, batch.
"""

from __future__ import annotations

import jax

from sleep_jax import data as data_lib
from sleep_jax import sharding as shd
from sleep_jax.config import Config, ConfigError


def check_data(cfg: Config) -> data_lib.DataSpec:
  """Task and options (one example of each split is drawn), lengths and vocabulary."""
  info = data_lib.dataset_info(cfg.data)
  if cfg.data.source == "task":
    from sleep_jax.data import tasks as tasks_lib
    from sleep_jax.data.builders import data_seed, task_options

    for split, options in zip(("train", "eval"), task_options(cfg.data)):
      key = "data.task_options" if split == "train" else "data.eval_task_options"
      try:
        tasks_lib.generate(cfg.data.task, split, 0, data_seed(cfg.data), options)
      except (ValueError, TypeError, ArithmeticError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise data_lib.DataError(f"{key}: {why}") from None
  if cfg.data.source == "corpus":  # every corpus file readable text, every JSONL line parsed
    from sleep_jax.data.tokenized import scan_all

    scan_all(cfg.data)
    if info.vocab_size > cfg.model.vocab_size:
      raise ConfigError(f"bad value for config key 'model.vocab_size': {cfg.model.vocab_size} < the vocabulary of "
                        f"data.tokenizer={cfg.data.tokenizer} ({info.vocab_size} tokens)")
  if info.example_len > cfg.data.seq_len:
    what = "text windows" if cfg.data.source == "text" else f"task '{cfg.data.task}' examples"
    raise data_lib.DataError(f"data.seq_len={cfg.data.seq_len} is too short: {what} need {info.example_len} tokens")
  if info.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"bad value for config key 'model.vocab_size': {cfg.model.vocab_size} < the "
                      f"{cfg.data.task if cfg.data.source == 'task' else 'text'} data's vocabulary of {info.vocab_size}")
  return info


def check_mesh(mesh_cfg, batch_size: int, key: str = "train.batch_size") -> tuple[int, int, int]:
  """The mesh fits the devices, and the global batch splits over its batch axes and processes."""
  shape = shd.mesh_shape(mesh_cfg, jax.device_count())
  rows = shape[0] * shape[1]  # the batch is sharded over data x fsdp
  if batch_size % rows:
    raise ConfigError(f"bad value for config key '{key}': {batch_size} is not divisible by the mesh's batch "
                      f"axes (mesh.data x mesh.fsdp = {shape[0]} x {shape[1]} = {rows})")
  if batch_size % jax.process_count():
    raise ConfigError(f"bad value for config key '{key}': {batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
  return shape


def check_train(cfg: Config) -> None:
  check_data(cfg)
  check_mesh(cfg.mesh, cfg.train.batch_size)

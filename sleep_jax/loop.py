"""The training driver: config checks, the run lock, data, eval; the steps run on engine.py.

`train(cfg)` is what `sleep-jax train` runs. Running it twice on the same run dir resumes
from the newest readable checkpoint, with the data iterator and RNG where they were, so the
logged losses are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

from sleep_jax import config as config_lib
from sleep_jax import data as data_lib
from sleep_jax import distributed, engine, preflight, run_lock
from sleep_jax import sharding as shd
from sleep_jax.evaluate import evaluate
from sleep_jax.throughput import Throughput, peak_flops_per_device
from sleep_jax.train import Trainer

log = logging.getLogger("sleep_jax")

# Keys that may change between runs on one run dir (how it runs, not what it computes).
# train.steps may grow to extend a run; note that this stretches the LR schedule.
RESUMABLE_CHANGES = ("run_dir", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.profile_steps", "train.peak_flops_per_device",
                     "checkpoint.", "mesh.", "distributed.", "data.prefetch", "data.data_dir",
                     "seeding.student_mesh.", "seeding.methods", "seeding.eval_every", "dreaming.methods",
                     # seed s of a dreaming run depends on (seed, s) only: more seeds add seed dirs
                     "dreaming.seeds")


def check_saved_config(cfg: config_lib.Config) -> None:
  """Refuse to resume a run dir whose saved config computes something else. (A start that
  fails its checks writes no config.yaml: see preflight.py.)"""
  path = os.path.join(cfg.run_dir, "config.yaml")
  if not os.path.exists(path):
    return
  saved = config_lib.load_config(path)
  changed = [d for d in config_lib.diff(saved, cfg) if not d.startswith(RESUMABLE_CHANGES)]
  if changed:
    raise config_lib.ConfigError(f"run dir {cfg.run_dir} holds a run with a different config: {'; '.join(changed)}")


class Profile:
  """train.profile_steps = [start, stop]: a jax.profiler trace of steps start..stop (numbered
  as logged, from 1) into run_dir/profile; the trace stops once step stop has finished."""

  def __init__(self, cfg: config_lib.Config):
    self.range = tuple(cfg.train.profile_steps) or None
    self.dir = os.path.join(cfg.run_dir, "profile")
    self.on = False

  def before(self, step: int) -> None:
    if self.range and step == self.range[0] and not self.on:
      jax.profiler.start_trace(self.dir)
      self.on = True

  def stops_at(self, step: int) -> bool:
    return self.on and step >= self.range[1]

  def after(self, step: int) -> None:
    if self.stops_at(step):
      self.close()

  def close(self) -> None:
    if self.on:
      self.on = False
      jax.profiler.stop_trace()
      log.info("profile of steps %d-%d written to %s", *self.range, self.dir)


def write_config(cfg: config_lib.Config) -> None:
  if jax.process_index() == 0:
    os.makedirs(cfg.run_dir, exist_ok=True)
    # Atomic: other processes may be reading it in check_saved_config at this moment.
    path = os.path.join(cfg.run_dir, "config.yaml")
    with open(path + ".tmp", "w") as f:
      f.write(config_lib.to_yaml(cfg))
    os.replace(path + ".tmp", path)


def train(cfg: config_lib.Config) -> dict[str, Any]:
  distributed.maybe_initialize(cfg.distributed)
  # Everything that can be checked is, before the run dir is touched (preflight.py).
  preflight.check_train(cfg)
  trainer = Trainer(cfg)
  with run_lock.hold(cfg.run_dir, what="train", process=jax.process_index()):
    check_saved_config(cfg)
    write_config(cfg)
    return _train(cfg, trainer)


def _train(cfg: config_lib.Config, trainer: Trainer) -> dict[str, Any]:
  slot, slots = shd.process_slot(trainer.mesh, cfg.train.batch_size)

  def data(start: int, saved: dict | None) -> engine.MeshBatches:
    it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                                      process_index=slot, process_count=slots, start_step=start)
    return engine.MeshBatches(it, trainer.mesh, saved)

  stage = engine.Stage(
      dir=cfg.run_dir, steps=cfg.train.steps, abstract_state=trainer.abstract_state, init=trainer.init_state,
      step_fn=trainer.step_fn, data=data, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
      async_save=cfg.checkpoint.async_save, log_every=cfg.train.log_every, eval_every=cfg.train.eval_every,
      on_eval=lambda state, _: evaluate(trainer, state["params"], num_batches=cfg.train.eval_batches),
      desc="train", profile=Profile(cfg),
      throughput=Throughput(cfg.train.batch_size * (cfg.data.seq_len - 1),
                            peak_flops_per_device(cfg.train.peak_flops_per_device)))
  eval_path = os.path.join(cfg.run_dir, "eval.json")
  with engine.Run(stage) as run:
    if run.step >= cfg.train.steps and os.path.exists(eval_path):
      with open(eval_path) as f:  # a finished run: report its final eval instead of logging it twice
        return json.load(f)
    state = run.loop()
    # Everything is saved: from here a signal exits at once (a requeued run re-evaluates).
    result = evaluate(trainer, state["params"], num_batches=cfg.train.eval_batches)
    run.writer.write(run.step, result)
    result.update({"step": run.step, "timing": run.timing})
    if jax.process_index() == 0:
      with open(eval_path, "w") as f:
        json.dump(result, f, indent=2)
    return result

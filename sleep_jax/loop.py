"""The training loop: resume, data, jitted steps, logging, eval, checkpoints, preemption.

`train(cfg)` is what `sleep-jax train` runs. Running it twice on the same run dir resumes
from the newest readable checkpoint, with the data iterator and RNG where they were, so the
logged losses are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from sleep_jax import config as config_lib
from sleep_jax import data as data_lib
from sleep_jax import distributed, exit_codes, preflight, run_lock, signals
from sleep_jax import sharding as shd
from sleep_jax.evaluate import evaluate
from sleep_jax.checkpoint import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, Checkpointer
from sleep_jax.metrics import MetricWriter
from sleep_jax.throughput import Throughput, peak_flops_per_device
from sleep_jax.train import Trainer

log = logging.getLogger("sleep_jax")

# Keys that may change between runs on one run dir (how it runs, not what it computes).
# train.steps may grow to extend a run; note that this stretches the LR schedule.
RESUMABLE_CHANGES = ("run_dir", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.profile_steps", "train.peak_flops_per_device",
                     "checkpoint.", "mesh.", "distributed.", "data.prefetch", "data.data_dir",
                     "seeding.student_mesh.", "seeding.methods", "seeding.eval_every", "dreaming.methods")


class NonFiniteLoss(RuntimeError):
  exit_code = NONFINITE_EXIT_CODE


class Preempted(SystemExit):
  def __init__(self):
    super().__init__(PREEMPTED_EXIT_CODE)


class Interrupted(SystemExit):
  def __init__(self):
    super().__init__(exit_codes.INTERRUPTED)


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


def any_process(flag: bool) -> bool:
  """True if `flag` is set on any process (a tiny allgather; multi-process runs only)."""
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


class Preemption:
  """A loop that saves at its step boundaries, from construction until `restore()`: SIGTERM
  and SIGINT are then recorded (signals.py), not acted on. `requested()`, called once per
  step on every process, is True on all of them as soon as any process got either, so that
  they all save the same step; `exit()` then leaves with the signal's code (75 or 130)."""

  def __init__(self):
    self._own = not signals.installed()  # library use (no CLI): handlers only while the loop runs
    if self._own:
      signals.install()
    signals.enter_saving()
    self._term = self._int = self._restored = False

  def requested(self) -> bool:
    term, interrupt = signals.pending()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      term, interrupt = (bool(x) for x in np.any(multihost_utils.process_allgather(np.array([term, interrupt])), 0))
    self._term, self._int = term, interrupt
    return term or interrupt

  def exit(self, what: str, step: int):
    if self._term:
      log.warning("SIGTERM: %s saved step %d; exiting with code %d", what, step, PREEMPTED_EXIT_CODE)
      raise Preempted()
    log.warning("interrupted: %s saved step %d; exiting with code %d (run the same command to resume)", what, step,
                exit_codes.INTERRUPTED)
    raise Interrupted()

  def restore(self) -> None:
    if self._restored:
      return
    self._restored = True
    signals.leave_saving()
    if self._own:
      signals.uninstall()


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
  ckpt = Checkpointer(cfg.run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  restored = ckpt.restore_latest(trainer.abstract_state)
  if restored is None:
    step, state, data_state = 0, trainer.init_state(), None
  else:
    step, state, data_state = restored
    log.info("resumed from step %d", step)
  eval_path = os.path.join(cfg.run_dir, "eval.json")
  if step >= cfg.train.steps and os.path.exists(eval_path):
    ckpt.close()  # a finished run: report its final eval instead of logging it twice
    with open(eval_path) as f:
      return json.load(f)
  slot, slots = shd.process_slot(trainer.mesh, cfg.train.batch_size)
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed,
                                    process_index=slot, process_count=slots, start_step=step)
  if data_state is not None:
    it.set_state(data_state)
  writer = MetricWriter(cfg.run_dir, resume_step=step)
  preemption = Preemption()
  tokens_per_step = cfg.train.batch_size * (cfg.data.seq_len - 1)
  pbar = tqdm(total=cfg.train.steps, initial=step, disable=jax.process_index() != 0, desc="train",
              dynamic_ncols=True, mininterval=1.0)
  last_saved = step
  timing = {"data_s": 0.0, "step_s": 0.0, "save_s": 0.0, "steps": 0}
  rates = Throughput(tokens_per_step, peak_flops_per_device(cfg.train.peak_flops_per_device))
  profile = Profile(cfg)
  pending = None  # the last dispatched step whose metrics the host has not read yet
  t_prev = [0.0]

  def report(done: tuple) -> None:
    """Read one step's metrics to the host, stop on a non-finite loss, log them."""
    n, metrics, data_s, flops = done
    metrics = jax.device_get(metrics)
    now = time.perf_counter()
    if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
      raise NonFiniteLoss(f"non-finite loss ({metrics['loss']}) or grad norm ({metrics['grad_norm']}) at step "
                          f"{n}; stopped; the last good checkpoint (step {last_saved}) is kept in {ckpt.directory}")
    step_s = now - t_prev[0]
    timing["data_s"] += data_s
    timing["step_s"] += step_s
    timing["steps"] += 1
    if n % cfg.train.log_every == 0 or n == cfg.train.steps:
      writer.write(n, {**{k: float(v) for k, v in metrics.items()}, **rates.row(step_s, flops),
                       "data_wait_frac": data_s / max(step_s, 1e-9)})
    pbar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)
    pbar.update(1)
    t_prev[0] = now

  try:
    distributed.sync_before_first_collective()
    t_prev[0] = time.perf_counter()
    while step < cfg.train.steps:
      profile.before(step + 1)
      t0 = time.perf_counter()
      local = next(it)
      t1 = time.perf_counter()
      step_fn = trainer.step_fn(step)
      batch = shd.global_batch(local, trainer.mesh)
      flops = rates.flops(step_fn, trainer.abstract_state, batch)
      state, metrics = step_fn(state, batch)
      step += 1
      # Metrics are read one step late: the host pulls step s - 1's while step s runs, and
      # blocks on the step it just dispatched only where that step's state is about to be
      # saved or evaluated (its state is donated to the next step, so it must be checked
      # finite first), at the last step and at the end of a profiled range.
      if pending is not None:
        report(pending)
      pending = (step, metrics, t1 - t0, flops)
      ckpt.check()  # a failed async save stops the run now, not at the end
      preempted = preemption.requested()
      evals = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps
      saves = step % cfg.checkpoint.every == 0 or preempted
      if saves or evals or step == cfg.train.steps or profile.stops_at(step):
        report(pending)
        pending = None
        profile.after(step)
      if saves:
        t_s = time.perf_counter()
        ckpt.save(step, state, it.get_state(), wait=preempted)
        timing["save_s"] += time.perf_counter() - t_s
        last_saved = step
      if preempted:
        preemption.exit("training", step)
      if evals:
        writer.write(step, evaluate(trainer, state["params"], num_batches=cfg.train.eval_batches))
      if saves or evals:
        t_prev[0] = time.perf_counter()  # the next step's time leaves out the save and the eval
    if last_saved != step:
      ckpt.save(step, state, it.get_state())
    ckpt.wait()
    # Everything is saved: from here a signal exits at once (a requeued run re-evaluates).
    preemption.restore()
    result = evaluate(trainer, state["params"], num_batches=cfg.train.eval_batches)
    writer.write(step, result)
    result.update({"step": step, "timing": timing})
    if jax.process_index() == 0:
      with open(os.path.join(cfg.run_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
  finally:
    profile.close()
    pbar.close()
    preemption.restore()
    writer.close()
    ckpt.close()

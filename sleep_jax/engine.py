"""The one stage engine: any jitted step over a state pytree for N steps, resumably.

Training (`loop.train`), every seeding stage (teacher pretrain, fast expert, each
consolidation method) and dreaming's base pretrain are a `Stage` run by `Run`:

- exact resume from the newest readable checkpoint in `Stage.dir` (orbax, checksummed;
  a damaged one is moved aside and the previous one tried: checkpoint.py), with the batch
  source where it was (a pure function of the step, or a checkpointable iterator);
- metrics.jsonl, TensorBoard and tqdm, the metrics read one step late (the host pulls step
  s - 1's while step s runs);
- a non-finite loss or gradient norm stops with NonFiniteLoss (exit 3) before anything
  non-finite is saved; the last good checkpoint stays;
- SIGTERM / SIGINT save at the next step boundary and exit 75 / 130 (`Preemption`).

A resumed stage therefore logs exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from sleep_jax import distributed, exit_codes, signals
from sleep_jax import sharding as shd
from sleep_jax.checkpoint import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, Checkpointer
from sleep_jax.metrics import MetricWriter
from sleep_jax.throughput import Throughput

log = logging.getLogger("sleep_jax")

FINITE_KEYS = ("loss", "grad_norm")  # metrics that must be finite for a step's state to be kept


class NonFiniteLoss(RuntimeError):
  exit_code = NONFINITE_EXIT_CODE


class Preempted(SystemExit):
  def __init__(self):
    super().__init__(PREEMPTED_EXIT_CODE)


class Interrupted(SystemExit):
  def __init__(self):
    super().__init__(exit_codes.INTERRUPTED)


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


# -- batch sources: what a checkpoint needs to put the data back where it was ---------------
class StepBatches:
  """Batches as a pure function of the step index: the saved data state is the step."""

  def __init__(self, fn: Callable[[int], Any], start: int):
    self.fn, self.i = fn, start

  def __next__(self):
    batch = self.fn(self.i)
    self.i += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.i}


def step_batches(fn: Callable[[int], Any]) -> Callable[[int, dict | None], StepBatches]:
  return lambda start, saved: StepBatches(fn, start)


class MeshBatches:
  """A checkpointable iterator of this process's rows (grain), as global arrays on a mesh."""

  def __init__(self, it, mesh, saved: dict | None):
    self.it, self.mesh = it, mesh
    if saved is not None:
      it.set_state(saved)

  def __next__(self):
    return shd.global_batch(next(self.it), self.mesh)

  def get_state(self) -> dict:
    return self.it.get_state()


@dataclasses.dataclass
class Stage:
  """One resumable run of `step_fn(i)(state, batch) -> (state, metrics)` for i < steps.

  data(start, saved_data_state) makes the batch source for a start step; step_fn(i) is the
  step to run at step i (training switches jitted steps at phase boundaries). Checkpoints,
  metrics.jsonl and TensorBoard events live in `dir`."""

  dir: str
  steps: int
  abstract_state: Any
  init: Callable[[], Any]
  step_fn: Callable[[int], Callable]
  data: Callable[[int, dict | None], Iterator]
  every: int
  keep: int = 3
  async_save: bool = True
  log_every: int = 1
  eval_every: int = 0
  on_eval: Callable[[Any, int], dict] | None = None
  desc: str = "train"
  throughput: Throughput | None = None  # tokens/s, MFU per logged row (training)
  profile: Any = None  # loop.Profile (training's profile_steps)


class Run:
  """A stage restored on construction (`step`, `state`); `loop()` runs it to `steps`. Use as a
  context manager: leaving it closes the writer, the progress bar and the checkpointer."""

  def __init__(self, stage: Stage):
    self.stage = stage
    os.makedirs(stage.dir, exist_ok=True)
    self.ckpt = Checkpointer(stage.dir, keep=stage.keep, async_save=stage.async_save)
    self._writer = self.preemption = self.pbar = None
    self.timing = {"data_s": 0.0, "step_s": 0.0, "save_s": 0.0, "steps": 0}
    try:
      restored = self.ckpt.restore_latest(stage.abstract_state)
      if restored is None:
        self.step, self.state, self.data_state = 0, stage.init(), None
      else:
        self.step, self.state, self.data_state = restored
        if self.step < stage.steps:
          log.info("%s: resumed from step %d", stage.desc, self.step)
    except BaseException:  # nothing to run: the checkpointer's threads must not outlive it
      self.ckpt.close()
      raise

  @property
  def writer(self) -> MetricWriter:
    if self._writer is None:  # rows past the restored step are dropped (they are re-logged)
      self._writer = MetricWriter(self.stage.dir, resume_step=self.step)
    return self._writer

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    try:
      if self.stage.profile is not None:
        self.stage.profile.close()
      if self.pbar is not None:
        self.pbar.close()
      if self.preemption is not None:
        self.preemption.restore()
      if self._writer is not None:
        self._writer.close()
    finally:
      self.ckpt.close()

  def loop(self) -> Any:
    """Run to stage.steps; returns the final state, saved (a finished stage just returns it).
    From its return on, a signal exits at once (nothing is left unsaved)."""
    st, ckpt = self.stage, self.ckpt
    if self.step >= st.steps:
      return self.state
    step, state = self.step, self.state
    data = st.data(step, self.data_state)
    writer = self.writer
    self.preemption = preemption = Preemption()
    self.pbar = pbar = tqdm(total=st.steps, initial=step, disable=jax.process_index() != 0, desc=st.desc,
                            dynamic_ncols=True, mininterval=1.0)
    profile, rates, timing = st.profile, st.throughput, self.timing
    last_saved = [step]
    pending = None  # the last dispatched step whose metrics the host has not read yet
    t_prev = [0.0]

    def report(done: tuple) -> None:
      """Read one step's metrics to the host, stop on a non-finite one, log them."""
      n, metrics, data_s, flops = done
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      bad = {k: metrics[k] for k in FINITE_KEYS if k in metrics and not np.isfinite(metrics[k])}
      if bad:
        what = " or ".join(f"{k.replace('_', ' ')} ({metrics[k]})" for k in FINITE_KEYS if k in metrics)
        raise NonFiniteLoss(f"non-finite {what} at step {n}; {st.desc} stopped; the last good checkpoint "
                            f"(step {last_saved[0]}) is kept in {ckpt.directory}")
      step_s = now - t_prev[0]
      timing["data_s"] += data_s
      timing["step_s"] += step_s
      timing["steps"] += 1
      if n % st.log_every == 0 or n == st.steps:
        extra = {**rates.row(step_s, flops), "data_wait_frac": data_s / max(step_s, 1e-9)} if rates else {}
        writer.write(n, {**metrics, **extra})
      pbar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
      pbar.update(1)
      t_prev[0] = now

    distributed.sync_before_first_collective()
    t_prev[0] = time.perf_counter()
    while step < st.steps:
      if profile is not None:
        profile.before(step + 1)
      t0 = time.perf_counter()
      batch = next(data)
      t1 = time.perf_counter()
      fn = st.step_fn(step)
      flops = rates.flops(fn, st.abstract_state, batch) if rates else None
      state, metrics = fn(state, batch)
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
      evals = bool(st.on_eval and st.eval_every and step % st.eval_every == 0 and step < st.steps)
      saves = step % st.every == 0 or preempted
      stops = profile is not None and profile.stops_at(step)
      if saves or evals or step == st.steps or stops:
        report(pending)
        pending = None
        if profile is not None:
          profile.after(step)
      if saves:
        t_s = time.perf_counter()
        ckpt.save(step, state, data.get_state(), wait=preempted)
        timing["save_s"] += time.perf_counter() - t_s
        last_saved[0] = step
      if preempted:
        preemption.exit(st.desc, step)
      if evals:
        writer.write(step, st.on_eval(state, step))
      if saves or evals:
        t_prev[0] = time.perf_counter()  # the next step's time leaves out the save and the eval
    if last_saved[0] != step:
      ckpt.save(step, state, data.get_state())
    ckpt.wait()
    preemption.restore()
    self.step, self.state = step, state
    return state


def run(stage: Stage) -> Any:
  """The stage's final state, trained (or resumed) to stage.steps."""
  with Run(stage) as r:
    return r.loop()

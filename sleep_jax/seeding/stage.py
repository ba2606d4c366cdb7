"""One resumable training stage of a multi-stage pipeline (seeding, dreaming).

A stage lives in its own directory (checkpoints/, metrics.jsonl, TensorBoard events) and
runs `step(state, i) -> (state, metrics)` for i = start .. steps - 1, where start comes from
the newest readable checkpoint (orbax; corrupt ones are moved aside as in training). A
finished stage (checkpoint at `steps`) just restores. Batches must be pure functions of the
step index, so a resumed stage computes exactly what an uninterrupted one would. NaN/Inf
stops with NonFiniteLoss keeping the last good checkpoint; SIGTERM saves and exits 75,
SIGINT saves and exits 130 (both at the next step boundary).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from sleep_jax.checkpoint import Checkpointer
from sleep_jax.loop import NonFiniteLoss, Preemption
from sleep_jax.metrics import MetricWriter

log = logging.getLogger("sleep_jax")


def run_stage(stage_dir: str, *, abstract_state: Any, init: Callable[[], Any],
              step: Callable[[Any, int], tuple[Any, dict]], steps: int, every: int, keep: int = 2,
              log_every: int = 1, desc: str = "", on_eval: Callable[[Any, int], dict] | None = None,
              eval_every: int = 0) -> Any:
  os.makedirs(stage_dir, exist_ok=True)
  ckpt = Checkpointer(stage_dir, keep=keep, async_save=False)
  restored = ckpt.restore_latest(abstract_state)
  start, state = (0, None) if restored is None else (restored[0], restored[1])
  if state is None:
    state = init()
  elif start < steps:
    log.info("%s: resumed from step %d", desc or stage_dir, start)
  if start >= steps:
    ckpt.close()
    return state
  writer = MetricWriter(stage_dir, resume_step=start)
  preemption = Preemption()
  pbar = tqdm(total=steps, initial=start, desc=desc, disable=jax.process_index() != 0, dynamic_ncols=True,
              mininterval=1.0)
  last_saved = start
  try:
    for i in range(start, steps):
      state, metrics = step(state, i)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics["loss"]):
        raise NonFiniteLoss(f"{desc}: non-finite loss ({metrics['loss']}) at step {i + 1}; stopped; the last "
                            f"good checkpoint (step {last_saved}) is kept in {ckpt.directory}")
      done = i + 1
      if done % log_every == 0 or done == steps:
        writer.write(done, metrics)
      if on_eval is not None and eval_every and done % eval_every == 0 and done < steps:
        writer.write(done, on_eval(state, done))
      pbar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
      pbar.update(1)
      preempted = preemption.requested()
      if done % every == 0 or done == steps or preempted:
        ckpt.save(done, state, {"step": done}, wait=True)
        last_saved = done
      if preempted:
        preemption.exit(desc or stage_dir, done)
    return state
  finally:
    pbar.close()
    preemption.restore()
    writer.close()
    ckpt.close()

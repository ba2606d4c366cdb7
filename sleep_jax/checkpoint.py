"""Orbax checkpoints: train state + data-iterator state, async saves, corrupt-checkpoint fallback.

Layout: RUN_DIR/checkpoints/<step>/{state,data}. Orbax writes each step to a temporary
directory and renames it when complete, so a half-written save never looks like a finished
one; a finished checkpoint that fails to restore (corrupted on disk) is reported and the
previous one is tried.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("sleep_jax")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; launchers requeue / retry on it
NONFINITE_EXIT_CODE = 3


class CheckpointError(RuntimeError):
  pass


class Checkpointer:
  def __init__(self, run_dir: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def save(self, step: int, state: Any, data_state: dict, *, wait: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    if wait:
      self.manager.wait_until_finished()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that restores, or None.

    `abstract_state` carries the target shardings, so a checkpoint written on one mesh is
    restored onto another.
    """
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["data"])
      except Exception as e:  # noqa: BLE001 - any failure to read means "corrupt"
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        log.warning("checkpoint at step %d is unreadable (%s); trying the previous one", step, msg)
        if jax.process_index() == 0:
          # Move it aside (not delete): the bytes stay for inspection, and the manager no
          # longer counts it as the latest step.
          src = os.path.join(self.directory, str(step))
          shutil.move(src, os.path.join(os.path.dirname(self.directory), f"corrupt_checkpoint_{step}"))
        self.manager.reload()
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

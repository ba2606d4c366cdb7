"""Orbax checkpoints: train state + data-iterator state, async saves, checksums, fallback.

Layout: RUN_DIR/checkpoints/<step>/{state,data,sha256.json}. Orbax writes each step to a
temporary directory and renames it when complete, so a half-written save never looks like
a finished one. The checksums of every file (integrity.py) are written into that temporary
directory just before the rename, and verified before a restore:

- a checkpoint that fails its checksums is damaged: it is reported, moved aside (never
  deleted) and the previous one is tried;
- any other failure to restore (a shape or mesh that does not match the config, an I/O
  error, memory) is not the checkpoint's fault: it stops with one line and moves nothing.

A save that fails (read-only directory, disk full) raises `SaveFailed` (exit 74) at once,
or at the next step for an async save; the checkpoints already written stay.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from sleep_jax import exit_codes, integrity

log = logging.getLogger("sleep_jax")

PREEMPTED_EXIT_CODE = exit_codes.PREEMPTED  # EX_TEMPFAIL: "try again"; launchers requeue / retry on it
NONFINITE_EXIT_CODE = exit_codes.NONFINITE
SAVE_FAILED_EXIT_CODE = exit_codes.SAVE_FAILED
_CLOSE_TIMEOUT_S = 10.0  # a manager whose save failed may never finish closing: abandon it


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored for a reason other than damage (one line, exit 2)."""


class SaveFailed(RuntimeError):
  exit_code = SAVE_FAILED_EXIT_CODE


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


class Checkpointer:
  """`set_aside=False` (readers such as `eval`, which hold no run-dir lock) skips a damaged
  checkpoint without moving it."""

  def __init__(self, run_dir: str, *, keep: int, async_save: bool = True, set_aside: bool = True):
    self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
    self.async_save = async_save
    self.set_aside = set_aside
    self._pending: Optional[int] = None  # step of a save not yet confirmed on disk
    self._failed = False
    self.last_good: Optional[int] = None
    async_options = ocp.AsyncOptions(post_finalization_callback=self._before_rename) if async_save else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True, async_options=async_options)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    steps = self.steps()
    self.last_good = steps[-1] if steps else None

  # -- saving ------------------------------------------------------------------------------
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _before_rename(self) -> None:
    """orbax's post-finalization callback (its background thread): every file is written,
    the directory not yet renamed into place, so the checksums land with the checkpoint."""
    step = self._pending
    if step is None or jax.process_index() != 0:
      return
    tmp = [d for d in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")) if os.path.isdir(d)]
    if len(tmp) == 1:  # else (another orbax layout, a bucket): written after the rename instead
      integrity.write_manifest(tmp[0], skip=integrity.LATE)

  def _fail(self, step: int, e: BaseException | str) -> SaveFailed:
    self._failed = True
    self._pending = None
    why = e if isinstance(e, str) else _first_line(e)
    kept = f"the last good checkpoint (step {self.last_good}) is kept" if self.last_good is not None else \
        "no checkpoint was written before it"
    return SaveFailed(f"checkpoint save at step {step} failed ({why}); stopped; {kept} in {self.directory}")

  def _confirm(self) -> None:
    """The pending save is on disk (with its checksums) or SaveFailed."""
    step = self._pending
    if step is None:
      return
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001 - whatever went wrong in orbax's thread
      raise self._fail(step, e) from None
    if not os.path.isdir(self._step_dir(step)):
      raise self._fail(step, "orbax did not finish writing it")
    if jax.process_index() == 0:
      try:
        integrity.add_late_files(self._step_dir(step))
      except OSError as e:
        raise self._fail(step, e) from None
    self._pending = None
    self.last_good = step

  def check(self) -> None:
    """Raise SaveFailed if a finished async save did not make it to disk (cheap; every step)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self._confirm()

  def save(self, step: int, state: Any, data_state: dict, *, wait: bool = False) -> None:
    if self._pending is not None:  # orbax would wait for it anyway: learn how it went first
      self.wait()
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    except Exception as e:  # noqa: BLE001 - mkdir / write errors surface here for sync saves
      raise self._fail(step, e) from None
    if wait or not self.async_save:
      self.wait()

  def wait(self) -> None:
    step = self._pending
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._fail(step if step is not None else -1, e) from None
    self._confirm()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # -- restoring ---------------------------------------------------------------------------
  def _move_aside(self, step: int) -> Optional[str]:
    src = self._step_dir(step)
    base = os.path.join(os.path.dirname(self.directory), f"corrupt_checkpoint_{step}")
    dst, n = base, 1
    while os.path.exists(dst):  # the same step may be set aside more than once
      dst, n = f"{base}.{n}", n + 1
    try:
      shutil.move(src, dst)
    except FileNotFoundError:  # another process of this job moved it first
      return None
    return dst

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest undamaged checkpoint, or None if none.

    `abstract_state` carries the target shardings, so a checkpoint written on one mesh is
    restored onto another. A checkpoint that passes its checksums but does not restore
    raises CheckpointError and nothing is moved.
    """
    for step in reversed(self.steps()):
      try:
        damage = integrity.verify(self._step_dir(step))
      except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint at step {step} in {self.directory} ({_first_line(e)}); "
                              "nothing was moved") from None
      if damage is not None:
        where = "left in place (read-only use)"
        if self.set_aside and jax.process_index() == 0:
          dst = self._move_aside(step)
          where = f"moved aside to {dst}" if dst else "already moved aside"
        elif self.set_aside:
          where = "moved aside by process 0"
        log.warning("checkpoint at step %d is unreadable (damaged: %s); %s; trying the previous one",
                    step, damage, where)
        self.manager.reload()
        continue
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - not damage (that is the checksums' job): stop
        raise CheckpointError(
            f"cannot restore the checkpoint at step {step} in {self.directory} ({_first_line(e)}); it passed "
            "its checksums, so the config, mesh or machine is the likelier cause; nothing was moved") from None
      self.last_good = step
      return step, restored["state"], dict(restored["data"])
    return None

  def close(self) -> None:
    if not self._failed:
      try:
        self.wait()
      finally:
        if self._failed:
          self._abandon()
        else:
          self.manager.close()
      return
    self._abandon()

  def _abandon(self) -> None:
    # After a failed save orbax's threads may never finish: close in a daemon thread and
    # stop waiting after a while, so that the process can still exit with its code.
    def close():
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 - the save's error was reported already
        pass

    t = threading.Thread(target=close, name="checkpoint_close", daemon=True)
    t.start()
    t.join(_CLOSE_TIMEOUT_S)
    if t.is_alive():
      log.warning("checkpoint manager did not close within %.0f s after a failed save; abandoned", _CLOSE_TIMEOUT_S)

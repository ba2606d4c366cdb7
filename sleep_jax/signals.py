"""SIGTERM and SIGINT, from the first line of `sleep-jax` to its exit.

A signal is acted on at once unless a loop is running that can save: then it is only
recorded, and the loop saves at its next step boundary and exits (`Preemption` in engine.py).

  SIGTERM, nothing to save (imports, dataset build, restore, final eval)   exit 75 at once
  SIGTERM inside a loop                        save at the step boundary, exit 75
  SIGINT (Ctrl-C), nothing to save             exit 130 at once, no traceback
  SIGINT inside a loop                         save at the step boundary, exit 130
  a second SIGINT                              exit 130 at once, without saving

75 is what launchers requeue on, so a preemption is never lost, whenever it comes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from sleep_jax import exit_codes

_state = {"savers": 0, "term": False, "int": 0}
_previous: dict[int, object] = {}


def _say(line: str) -> None:
  try:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
  except (OSError, ValueError):
    pass


def _leave(code: int) -> None:
  """Exit now. As the program: os._exit after flushing, because a SystemExit raised from a
  handler that lands in a gc callback or a __del__ is printed as "Exception ignored" and
  swallowed (seen: jax's _xla_gc_callback during a dataset build). Called in-process
  (tests, other code): SystemExit, so the caller decides."""
  if _state.get("hard"):
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    os._exit(code)
  raise SystemExit(code)


def _on_term(signum, frame) -> None:
  _state["term"] = True
  if _state["savers"] == 0:
    _say(f"SIGTERM: nothing new to save; exiting with code {exit_codes.PREEMPTED}")
    _leave(exit_codes.PREEMPTED)


def _on_int(signum, frame) -> None:
  _state["int"] += 1
  if _state["savers"] == 0 or _state["int"] > 1:
    what = "second interrupt: exiting at once, without saving" if _state["int"] > 1 else "interrupted"
    _say(f"{what} (exit {exit_codes.INTERRUPTED})")
    if _state["int"] > 1:
      # At once means not waiting for a save or a compile in progress; what was saved
      # before stays, and an unfinished async save is discarded on resume (as after SIGKILL).
      os._exit(exit_codes.INTERRUPTED)
    _leave(exit_codes.INTERRUPTED)
  _say("interrupt: saving at the next step boundary, then exiting (Ctrl-C again to exit at once)")


def installed() -> bool:
  return bool(_previous)


def install(*, hard_exit: bool = False) -> None:
  """Take over SIGTERM and SIGINT (main thread only; a no-op elsewhere or if done).
  hard_exit: the process is the program, so "exit at once" may be os._exit."""
  if _previous or threading.current_thread() is not threading.main_thread():
    return
  _state.update(term=False, int=0, hard=hard_exit)
  _previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_term)
  _previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_int)


def uninstall() -> None:
  for sig, handler in list(_previous.items()):
    signal.signal(sig, handler)
  _previous.clear()


def enter_saving() -> None:
  """A loop that saves at step boundaries starts: signals are recorded, not acted on."""
  _state["savers"] += 1


def leave_saving() -> None:
  _state["savers"] = max(0, _state["savers"] - 1)


def pending() -> tuple[bool, bool]:
  """(SIGTERM received, SIGINT received) since install."""
  return _state["term"], _state["int"] > 0

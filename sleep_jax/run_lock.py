"""One run at a time per run dir: an advisory file lock held for the life of the run.

`train`, `seed`, `dream` and each sweep point hold RUN_DIR/.lock (process i of a
multi-process job holds .lock.i, so a second job is refused on every process and none of
its processes is left waiting in a collective). A second process on a locked dir is refused
with one line naming the holder. The lock is `fcntl.flock`: the kernel drops it when its
process dies, however it dies, so a lock file left by a dead process is simply taken over
(and said so). The file is removed on a clean release. flock is advisory and per host: on
a network file system that does not pass flock between hosts it guards one host only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time

from sleep_jax.config import ConfigError

log = logging.getLogger("sleep_jax")

_held: dict[str, list] = {}  # path -> [fd, depth]: a process may re-enter its own lock


class RunDirBusy(ConfigError):
  """Another live process holds the run dir (one line, exit 2)."""


def lock_path(run_dir: str, process: int = 0) -> str:
  return os.path.join(os.path.abspath(run_dir), ".lock" if process == 0 else f".lock.{process}")


def _holder_text(info: dict) -> str:
  if not info:
    return "another process"
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
  return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, since {since})"


def _read(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536).decode(errors="replace")
    return json.loads(raw) if raw.strip() else {}
  except (OSError, ValueError):
    return {}


def _acquire(path: str, what: str) -> int:
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      info = _read(fd)
      os.close(fd)
      raise RunDirBusy(f"run dir {os.path.dirname(path)} is in use by {_holder_text(info)}; wait for it to "
                       f"finish or use another run_dir") from None
    # The holder may have released and unlinked the file between our open and flock: then we
    # hold a lock on a file nobody else will see. Retry on the path's current file.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  stale = _read(fd)
  if stale:
    log.warning("run dir lock: taking over the stale lock of %s (that process is gone)", _holder_text(stale))
  info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
          "command": " ".join(["sleep-jax", what, *sys.argv[2:]])[:300]}
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, json.dumps(info).encode())
  os.fsync(fd)
  return fd


@contextlib.contextmanager
def hold(run_dir: str, *, what: str = "train", process: int = 0):
  """Hold the run dir's lock for the body (re-entrant within one process)."""
  os.makedirs(os.path.abspath(run_dir), exist_ok=True)
  path = lock_path(run_dir, process)
  if path in _held:
    _held[path][1] += 1
  else:
    _held[path] = [_acquire(path, what), 1]
  try:
    yield
  finally:
    entry = _held[path]
    entry[1] -= 1
    if entry[1] == 0:
      del _held[path]
      with contextlib.suppress(OSError):
        os.unlink(path)  # while still locked: whoever opened it before must retry (see _acquire)
      os.close(entry[0])

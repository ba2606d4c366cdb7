"""`sleep-jax launch local`: P processes on this machine, D fake CPU devices each.

Each process gets XLA_FLAGS=--xla_force_host_platform_device_count=D and the explicit
jax.distributed coordinates that `sleep_jax.distributed` reads (SLEEP_JAX_COORDINATOR on a
free loopback port, SLEEP_JAX_NUM_PROCESSES, SLEEP_JAX_PROCESS_ID), and writes its own log
(RUN_DIR/logs/process_I.log unless --log-dir). If one process dies the others are killed at
once (with a dead peer they would only hang in a collective) and the launch fails naming the
process, how it died and its log. A process that was preempted (exit 75 after its SIGTERM
checkpoint) or killed by a signal is retried up to --retries times; each relaunch resumes
from the run dir's latest checkpoint, as `sleep-jax train` always does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from typing import Optional

from sleep_jax.launch import common
from sleep_jax.launch.common import LaunchError, announce, preempted_exit_code

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_POLL_S = 0.2


def add_arguments(p) -> None:
  p.add_argument("-n", "--processes", type=int, default=1, metavar="P", help="processes to start (default 1)")
  p.add_argument("-d", "--devices-per-process", type=int, default=1, metavar="D",
                 help="fake CPU devices per process (default 1)")
  p.add_argument("--log-dir", help="one log per process here (default: RUN_DIR/logs)")
  p.add_argument("--grace", type=float, default=30.0, metavar="S",
                 help="seconds the processes get to checkpoint after this launcher is interrupted (default 30)")
  common.add_common_arguments(
      p, entrypoint=common.local_entrypoint(), retries=0,
      retries_help="relaunch up to N times after a preemption (exit 75) or a process killed by a signal (default 0)")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(extra: dict[str, str], n: int, devices: int, index: int, port: int) -> dict[str, str]:
  """The variables this launcher sets for process `index` (on top of its own environment)."""
  flags = [f for f in f"{os.environ.get('XLA_FLAGS', '')} {extra.get('XLA_FLAGS', '')}".split()
           if not f.startswith(_DEVICE_FLAG)]
  env = {**extra, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags + [f"{_DEVICE_FLAG}={devices}"]),
         "PYTHONUNBUFFERED": "1"}
  if n > 1:
    env.update(SLEEP_JAX_COORDINATOR=f"127.0.0.1:{port}", SLEEP_JAX_NUM_PROCESSES=str(n),
               SLEEP_JAX_PROCESS_ID=str(index))
  return env


def _log_dirs(args, units) -> list[str]:
  if args.log_dir:
    if len(units) == 1:
      return [args.log_dir]
    return [os.path.join(args.log_dir, "collect" if u.argv[-1] == "--collect" else f"point_{u.argv[-1]}")
            for u in units]
  return [os.path.join(u.run_dir or os.path.join("runs", "launch"), "logs") for u in units]


def run(args, job: common.Job) -> int:
  if args.processes < 1 or args.devices_per_process < 1:
    raise LaunchError("--processes and --devices-per-process must be >= 1")
  if args.retries < 0:
    raise LaunchError("--retries must be >= 0")
  entry, extra = common.entry_argv(args), common.env_pairs(args.env)
  units = job.units + ([job.collect] if job.collect else [])
  if job.done_points:
    announce(f"sweep points already done, skipped: {', '.join(map(str, job.done_points))}")
  for unit, log_dir in zip(units, _log_dirs(args, units)):
    n = args.processes if unit.distributed else 1
    if args.dry_run:
      port = free_port()
      print(f"# {unit.name}: {n} process(es) x {args.devices_per_process} device(s); coordinator port "
            f"{port} is a free one, picked again at launch")
      for i in range(n):
        env = process_env(extra, n, args.devices_per_process, i, port)
        common.print_command(["env", *(f"{k}={v}" for k, v in env.items()), *entry, *unit.argv],
                             f"> {os.path.join(log_dir, f'process_{i}.log')} 2>&1")
      continue
    rc = run_unit(unit, entry, extra, n, args.devices_per_process, log_dir, retries=args.retries, grace=args.grace)
    if rc:
      return rc
  return 0


def run_unit(unit, entry: list[str], extra: dict[str, str], n: int, devices: int, log_dir: str, *,
             retries: int, grace: float) -> int:
  """Run one unit on n processes, retrying as documented above; the exit code of the launch."""
  os.makedirs(log_dir, exist_ok=True)
  logs = [os.path.join(log_dir, f"process_{i}.log") for i in range(n)]
  for attempt in range(retries + 1):
    if attempt:
      announce(f"relaunching {unit.name} (retry {attempt} of {retries}); it resumes from its latest checkpoint")
    group = _Group(unit, entry, extra, n, devices, logs, attempt)
    failed = group.supervise(grace)
    if failed is None:
      announce(f"{unit.name}: all {n} process(es) finished")
      return 0
    index, rc = failed
    retriable = rc == preempted_exit_code() or rc < 0
    will_retry = retriable and attempt < retries and not group.interrupted
    announce(f"error: {unit.name}: process {index} of {n} (pid {group.procs[index].pid}) {_how(rc)}; "
             + (f"stopped the other {n - 1}; " if n > 1 else "")
             + f"its log {logs[index]} ends:\n{_tail(logs[index])}"
             + ("" if will_retry or not retriable else
                "\nlaunch: run the same launch again (or pass --retries) to resume from the latest checkpoint"))
    if not will_retry:
      return 128 - rc if rc < 0 else rc
  return 1  # not reached


def _how(rc: int) -> str:
  if rc < 0:
    return f"was killed by {signal.Signals(-rc).name}"
  if rc == preempted_exit_code():
    return f"was preempted (exit {rc}, after saving a checkpoint)"
  return f"exited with code {rc}"


def _tail(path: str, lines: int = 8) -> str:
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - 4096))
      text = f.read().decode(errors="replace").replace("\r", "\n")
  except OSError as e:
    return f"  (unreadable: {e})"
  return "\n".join("  | " + l for l in [l for l in text.splitlines() if l.strip()][-lines:])


class _Group:
  """The n processes of one attempt, each in its own session so a kill reaches its children."""

  def __init__(self, unit, entry, extra, n, devices, logs, attempt):
    port = free_port()
    self.interrupted = 0.0  # monotonic time of the launcher's SIGINT/SIGTERM
    self.procs: list[subprocess.Popen] = []
    for i in range(n):
      env = {**os.environ, **process_env(extra, n, devices, i, port)}
      if n == 1:
        for k in ("SLEEP_JAX_COORDINATOR", "SLEEP_JAX_NUM_PROCESSES", "SLEEP_JAX_PROCESS_ID"):
          env.pop(k, None)
      with open(logs[i], "a") as log:
        log.write(f"==== sleep-jax launch: {unit.name}, process {i} of {n}, attempt {attempt + 1}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
        log.flush()
        self.procs.append(subprocess.Popen([*entry, *unit.argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
      announce(f"{unit.name}: process {i} of {n} pid {self.procs[-1].pid} log {logs[i]}")

  def _signal(self, sig: int, skip: int = -1) -> None:
    for i, p in enumerate(self.procs):
      if i != skip and p.poll() is None:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass

  def supervise(self, grace: float) -> Optional[tuple[int, int]]:
    """None when all exit 0, else (index, returncode) of the process that failed first."""
    restore = {}
    if threading.current_thread() is threading.main_thread():
      def on_signal(signum, _frame):
        # Preemption of the launcher is passed on: the processes checkpoint and exit 75.
        self.interrupted = self.interrupted or time.monotonic()
        announce(f"{signal.Signals(signum).name}: asking the processes to checkpoint and stop")
        self._signal(signal.SIGTERM)
      restore = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      return self._watch(grace)
    finally:
      for s, h in restore.items():
        signal.signal(s, h)

  def _watch(self, grace: float) -> Optional[tuple[int, int]]:
    while True:
      rcs = [p.poll() for p in self.procs]
      failed = [i for i, rc in enumerate(rcs) if rc not in (None, 0)]
      if failed:
        # A crash or kill says more than a peer's preemption exit: report that one.
        first = min(failed, key=lambda i: (rcs[i] == preempted_exit_code(), i))
        if rcs[first] == preempted_exit_code():
          self._wait(grace)  # the others are saving the same checkpoint step
        self._signal(signal.SIGKILL)
        self._wait(None)
        return first, rcs[first]
      if all(rc == 0 for rc in rcs):
        return None
      if self.interrupted and time.monotonic() - self.interrupted > grace:
        self._signal(signal.SIGKILL)  # they had their chance to checkpoint
      time.sleep(_POLL_S)

  def _wait(self, timeout: Optional[float]) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        return

"""What every backend shares: the COMMAND a launch runs, its safety checks, dry-run output.

A launch runs one `sleep-jax` sub-command (`train CONFIG k=v ...`, `sweep SWEEP.yaml`, ...).
`parse_command` reads it with the CLI's own parser, so a launch takes exactly what
`sleep-jax` takes; before anything starts it refuses a train run dir whose saved config
computes something else (the same check `train` makes, done early so no job is queued for
nothing). A sweep without `--point` fans out: one job (or array element) per unfinished point,
each running `sleep-jax sweep SWEEP.yaml --point I`, then `--collect`.

Commands are argument lists all the way down. Where a scheduler insists on a shell string
(an sbatch script, `gcloud ... ssh --command`, `xpk --command`) it is built with
`shlex.quote`/`shlex.join`, so a value like `run_dir='x; rm -rf /'` stays one inert word.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from typing import Optional

from sleep_jax.config import ConfigError

__all__ = ["LaunchError", "Job", "parse_command", "add_common_arguments", "preempted_exit_code"]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODES = ("collect", "list", "dry_run")  # sweep modes that run in one process


def preempted_exit_code() -> int:
  # Imported when used: sleep_jax.checkpoint pulls in orbax, whose import installs a root
  # logging handler, and `register` runs before the CLI configures logging.
  from sleep_jax.checkpoint import PREEMPTED_EXIT_CODE
  return PREEMPTED_EXIT_CODE


class LaunchError(ConfigError):
  """A launch that cannot start as asked; one line (the CLI prints it and exits 2)."""


@dataclasses.dataclass
class Unit:
  """One thing to run on the backend's processes: a train, one sweep point, a collect."""
  argv: list[str]  # sleep-jax sub-command and its arguments, e.g. ["train", "cfg.yaml", "k=v"]
  name: str  # for messages and remote job names
  run_dir: Optional[str] = None  # where its logs go by default (None: not known)
  distributed: bool = True  # False: one process is enough (collect)


@dataclasses.dataclass
class Job:
  units: list[Unit]  # what to run, in order
  sweep: Optional[object] = None  # sleep_jax.sweep.Sweep when COMMAND fanned a sweep out
  points: list[int] = dataclasses.field(default_factory=list)  # sweep points still to run
  collect: Optional[Unit] = None  # the sweep's `--collect`, to run after its points
  done_points: list[int] = dataclasses.field(default_factory=list)
  sweep_argv: list[str] = dataclasses.field(default_factory=list)  # `sweep SWEEP [overrides]`


def split_command(command: list[str]) -> list[str]:
  cmd = list(command)
  if cmd and cmd[0] == "--":
    cmd = cmd[1:]
  if cmd and os.path.basename(cmd[0]) == "sleep-jax":
    cmd = cmd[1:]
  if not cmd:
    raise LaunchError("no COMMAND: write it after `--`, e.g. `sleep-jax launch local -- train experiments/tiny.yaml`")
  return cmd


def check_argv(argv: list[str]) -> None:
  # NUL cannot travel in an argv; a newline would break the one-line shell strings of the
  # remote backends' job specs (xpk's YAML block), so both are refused up front.
  for a in argv:
    if "\0" in a or "\n" in a or "\r" in a:
      raise LaunchError(f"argument {a!r} contains a NUL or newline; refused")


def parse_command(command: list[str]) -> Job:
  """COMMAND (after `--`) -> the units to run; config checks happen here, before any launch."""
  from sleep_jax import cli

  argv = split_command(command)
  check_argv(argv)
  parser = cli.build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit:
    raise LaunchError(f"COMMAND {shlex.join(argv)!r} is not a valid sleep-jax command (see above)") from None
  if argv[0] == "launch":
    raise LaunchError("COMMAND may not itself be a launch")
  if argv[0] == "train":
    return Job([Unit(argv, "train", run_dir=_check_train(args.config, args.overrides))])
  if argv[0] == "sweep":
    return _sweep_job(args, argv)
  return Job([Unit(argv, argv[0])])


def _check_train(config: str, overrides: list[str]) -> str:
  from sleep_jax.config import load_config
  from sleep_jax.loop import check_saved_config

  cfg = load_config(config, overrides)
  check_saved_config(cfg)  # names the differing keys
  return cfg.run_dir


def _sweep_job(args, argv: list[str]) -> Job:
  from sleep_jax import sweep as sweep_lib
  from sleep_jax.loop import check_saved_config

  sweep = sweep_lib.load_sweep(args.sweep, args.overrides)
  base = ["sweep", args.sweep, *args.overrides]
  if args.point is not None:
    sweep_lib.check_data(sweep, [args.point])
    check_saved_config(sweep.configs[args.point])
    p = sweep.points[args.point]
    return Job([Unit(argv, f"point {p.index} ({p.name})", run_dir=p.run_dir)], sweep, [p.index], sweep_argv=base)
  if any(getattr(args, m) for m in _MODES):
    return Job([Unit(argv, "sweep", distributed=False)], sweep, sweep_argv=base)
  indices = list(range(len(sweep.points)))
  sweep_lib.check_data(sweep, indices)
  for i in indices:
    check_saved_config(sweep.configs[i])
  status = {i: sweep_lib.point_status(sweep, i) for i in indices}
  todo = [i for i in indices if status[i] != "done"]
  units = [Unit(base + ["--point", str(i)], f"point {i} ({sweep.points[i].name})", run_dir=sweep.points[i].run_dir)
           for i in todo]
  collect = Unit(base + ["--collect"], "collect", run_dir=sweep.root, distributed=False)
  return Job(units, sweep, todo, collect, [i for i in indices if status[i] == "done"], sweep_argv=base)


# ---------------------------------------------------------------------------------------
# Options and helpers shared by the backends


def add_common_arguments(p: argparse.ArgumentParser, *, entrypoint: str, retries: int, retries_help: str) -> None:
  p.add_argument("--dry-run", action="store_true",
                 help="print the exact commands and files this launch would run or write, and stop")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the job's processes (repeatable)")
  p.add_argument("--entrypoint", default=entrypoint,
                 help=f"how `sleep-jax` is invoked where the job runs, split like a shell would (default: {entrypoint})")
  p.add_argument("--retries", type=int, default=retries, metavar="N", help=retries_help)
  p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                 help="a sleep-jax sub-command, e.g. `-- train experiments/tiny.yaml train.steps=10`")


def local_entrypoint() -> str:
  # This interpreter: the job sees exactly the installed sleep_jax that launched it.
  return shlex.join([sys.executable, "-m", "sleep_jax.cli"])


def entry_argv(args) -> list[str]:
  entry = shlex.split(args.entrypoint)
  if not entry:
    raise LaunchError("--entrypoint is empty")
  return entry


def env_pairs(items: list[str]) -> dict[str, str]:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not _ENV_NAME.fullmatch(key):
      raise LaunchError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
    check_argv([value])
    out[key] = value
  return out


def env_prefix(env: dict[str, str]) -> list[str]:
  """`env K=V ...` words for a remote command line (empty when there is nothing to set)."""
  return ["env", *(f"{k}={v}" for k, v in env.items())] if env else []


def shell_line(argv: list[str]) -> str:
  check_argv(argv)
  return shlex.join(argv)


def announce(msg: str) -> None:
  print(f"launch: {msg}", file=sys.stderr, flush=True)


def print_command(argv: list[str], comment: str = "") -> None:
  print(shlex.join(argv) + (f"  # {comment}" if comment else ""), flush=True)


def print_file(path: str, text: str) -> None:
  print(f"# file {path}:\n{text.rstrip()}\n# end of {path}", flush=True)


def write_file(path: str, text: str, *, mode: int = 0o644) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, mode)

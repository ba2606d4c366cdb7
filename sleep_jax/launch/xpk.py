"""`sleep-jax launch xpk`: `xpk workload create` on a GKE cluster (TPU slices, multislice).

One workload per run (a sweep: one per unfinished point, named WORKLOAD-pI; collect
afterwards with `sleep-jax sweep SWEEP --collect` where the run dirs are). xpk runs COMMAND
in the container on every VM of every slice; JAX finds its peers from the JobSet's
environment. Preemption: --retries N becomes `--max-restarts N --restart-on-exit-codes 75`,
so a run that saved its checkpoint and exited 75 is restarted by the JobSet and resumes.
The run dir must be shared storage (e.g. a gs:// bucket mounted with --storage).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from sleep_jax.launch import common
from sleep_jax.launch.common import LaunchError

_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # xpk's own name_type pattern
_MAX_NAME = 40


def _default_xpk() -> str:
  beside = os.path.join(os.path.dirname(sys.executable), "xpk")  # the venv's own, if installed
  return beside if os.path.exists(beside) else "xpk"


def add_arguments(p) -> None:
  p.add_argument("--cluster", required=True, help="GKE cluster name")
  p.add_argument("--workload", help="workload name (default sleep-jax-MMDD-HHMMSS; a sweep appends -pI)")
  dev = p.add_mutually_exclusive_group(required=True)
  dev.add_argument("--tpu-type", help="e.g. v5litepod-256")
  dev.add_argument("--device-type", help="xpk device type, e.g. h100-80gb-8 (GPU) or n2-standard-32-4 (CPU)")
  p.add_argument("--num-slices", type=int, default=1, help="slices (multislice over DCN; default 1)")
  p.add_argument("--num-nodes", type=int, help="nodes for GPU/CPU device types")
  img = p.add_mutually_exclusive_group()
  img.add_argument("--docker-image", help="run this image as is (sleep_jax installed in it)")
  img.add_argument("--base-docker-image", help="xpk builds an image from this one plus the current directory")
  p.add_argument("--project")
  p.add_argument("--zone")
  p.add_argument("--priority", choices=("very-low", "low", "medium", "high", "very-high"))
  p.add_argument("--storage", action="append", default=[], help="xpk storage to mount (repeatable)")
  p.add_argument("--xpk-option", action="append", default=[], metavar="OPT",
                 help="extra xpk argument, e.g. --xpk-option=--spot (repeatable)")
  p.add_argument("--xpk", default=_default_xpk(), help="xpk executable (default: the one beside this python)")
  common.add_common_arguments(
      p, entrypoint="sleep-jax", retries=0,
      retries_help="restart the workload up to N times after it exits 75 (preempted) (default 0)")


def workload_names(args, job: common.Job) -> list[str]:
  base = args.workload or time.strftime("sleep-jax-%m%d-%H%M%S")
  names = [f"{base}-p{i}" for i in job.points] if job.collect is not None else [base]
  for name in names:
    if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
      raise LaunchError(f"workload name {name!r}: lowercase letters, digits and '-', starting with a letter, "
                        f"at most {_MAX_NAME} characters")
  return names


def create_command(args, name: str, argv: list[str]) -> list[str]:
  """`xpk workload create ...`; --command is shell text (xpk runs it under bash -c), so quoted."""
  command = common.shell_line(common.env_prefix(common.env_pairs(args.env)) + common.entry_argv(args) + argv)
  out = [args.xpk, "workload", "create", f"--cluster={args.cluster}", f"--workload={name}"]
  out.append(f"--tpu-type={args.tpu_type}" if args.tpu_type else f"--device-type={args.device_type}")
  out.append(f"--num-slices={args.num_slices}")
  if args.num_nodes is not None:
    out.append(f"--num-nodes={args.num_nodes}")
  for flag in ("docker_image", "base_docker_image", "project", "zone", "priority"):
    if getattr(args, flag):
      out.append(f"--{flag.replace('_', '-')}={getattr(args, flag)}")
  out += [f"--storage={s}" for s in args.storage]
  if args.retries:
    out += [f"--max-restarts={args.retries}", f"--restart-on-exit-codes={common.preempted_exit_code()}"]
  return out + list(args.xpk_option) + [f"--command={command}"]


def run(args, job: common.Job) -> int:
  if args.num_slices < 1 or args.retries < 0:
    raise LaunchError("--num-slices must be >= 1, --retries >= 0")
  common.check_argv(args.xpk_option + args.storage)
  units = job.units
  names = workload_names(args, job)
  commands = [create_command(args, name, u.argv) for name, u in zip(names, units)]
  if job.collect is not None:
    common.announce(f"after the workloads finish, collect where the run dirs are: "
                    f"sleep-jax {common.shell_line(job.collect.argv)}")
  for argv in commands:
    if args.dry_run:
      common.print_command(argv)
      continue
    common.print_command(argv)
    rc = subprocess.run(argv).returncode
    if rc:
      common.announce(f"error: xpk exited with code {rc}")
      return rc
  return 0

"""`sleep-jax launch tpu-vm`: run COMMAND on every worker of a Cloud TPU VM (pod slice).

The gcloud commands, in order: create the TPU VM (`gcloud compute tpus tpu-vm create`, or
for spot capacity `gcloud compute tpus queued-resources create ... --spot`, then describe
until ACTIVE), run COMMAND on all workers at once (`tpu-vm ssh --worker=all --command=...`;
JAX finds the pod's other hosts itself), and with --delete delete what was created. A sweep
runs its unfinished points one after another, then `--collect` on worker 0. --reuse runs on
an existing TPU VM. A run that exits 75 (preempted, checkpoint saved) is rerun up to
--retries times; the run dir must be on storage that outlives the VM (e.g. a GCS-fuse mount
or a persistent disk) for the rerun to resume.
"""

from __future__ import annotations

import subprocess
import time

from sleep_jax.launch import common
from sleep_jax.launch.common import LaunchError, announce

_ACTIVE_POLL_S = 30.0


def add_arguments(p) -> None:
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b")
  p.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  p.add_argument("--tpu-type", help="accelerator type, e.g. v4-32 or v5litepod-16 (needed unless --reuse)")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version (default %(default)s)")
  p.add_argument("--spot", action="store_true", help="ask for spot capacity through a queued resource")
  p.add_argument("--reuse", action="store_true", help="use an existing TPU VM: create and delete nothing")
  p.add_argument("--delete", action="store_true", help="delete the TPU VM (queued resource) when the run ends")
  p.add_argument("--workdir", help="directory on the workers to run in (a checkout with sleep_jax installed)")
  p.add_argument("--setup", help="shell command run on every worker first, e.g. 'pip install -e .' "
                 "(your own shell text: it is passed as written)")
  p.add_argument("--gcloud", default="gcloud", help="gcloud executable (default gcloud)")
  common.add_common_arguments(
      p, entrypoint="sleep-jax", retries=0,
      retries_help="rerun COMMAND up to N times after it exits 75 (preempted, checkpoint saved) (default 0)")


def _where(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def create_commands(args) -> list[list[str]]:
  g = args.gcloud
  if args.spot:
    return [[g, "compute", "tpus", "queued-resources", "create", args.name, f"--node-id={args.name}", *_where(args),
             f"--accelerator-type={args.tpu_type}", f"--runtime-version={args.version}", "--spot"]]
  return [[g, "compute", "tpus", "tpu-vm", "create", args.name, *_where(args), f"--accelerator-type={args.tpu_type}",
           f"--version={args.version}"]]


def describe_command(args) -> list[str]:
  return [args.gcloud, "compute", "tpus", "queued-resources", "describe", args.name, *_where(args),
          "--format=value(state.state)"]


def delete_command(args) -> list[str]:
  if args.spot:
    return [args.gcloud, "compute", "tpus", "queued-resources", "delete", args.name, *_where(args), "--force", "--quiet"]
  return [args.gcloud, "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]


def remote_line(args, argv: list[str]) -> str:
  """The shell text ssh runs on each worker: every value quoted, --setup as the user wrote it."""
  parts = []
  if args.workdir:
    parts.append(common.shell_line(["cd", args.workdir]))
  if args.setup:
    common.check_argv([args.setup])
    parts.append(f"( {args.setup} )")
  parts.append(common.shell_line(common.env_prefix(common.env_pairs(args.env)) + common.entry_argv(args) + argv))
  return " && ".join(parts)


def ssh_command(args, argv: list[str], worker: str = "all") -> list[str]:
  return [args.gcloud, "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args), f"--worker={worker}",
          f"--command={remote_line(args, argv)}"]


def run(args, job: common.Job) -> int:
  if not args.reuse and not args.tpu_type:
    raise LaunchError("--tpu-type is needed to create a TPU VM (or pass --reuse)")
  if args.retries < 0:
    raise LaunchError("--retries must be >= 0")
  steps = [(ssh_command(args, u.argv, "all" if u.distributed else "0"), u.name) for u in job.units]
  if job.collect is not None:
    steps.append((ssh_command(args, job.collect.argv, "0"), "collect"))
  if args.dry_run:
    for argv in ([] if args.reuse else create_commands(args)):
      common.print_command(argv)
    if args.spot and not args.reuse:
      common.print_command(describe_command(args), "repeated until it prints ACTIVE")
    for argv, name in steps:
      common.print_command(argv, name)
    if args.delete and not args.reuse:
      common.print_command(delete_command(args))
    return 0
  rc = 0
  try:
    if not args.reuse:
      for argv in create_commands(args):
        _call(argv)
      if args.spot:
        _wait_active(args)
    for argv, name in steps:
      rc = _run_step(argv, name, args.retries)
      if rc:
        break
  finally:
    if args.delete and not args.reuse:
      _call(delete_command(args), check=False)
  return rc


def _call(argv: list[str], check: bool = True) -> int:
  common.print_command(argv)
  rc = subprocess.run(argv).returncode
  if rc and check:
    raise LaunchError(f"{argv[0]} {' '.join(argv[1:5])} ... failed with exit code {rc}")
  return rc


def _wait_active(args) -> None:
  while True:
    res = subprocess.run(describe_command(args), capture_output=True, text=True)
    state = res.stdout.strip()
    if state == "ACTIVE":
      return
    if res.returncode or state in ("FAILED", "SUSPENDED"):
      raise LaunchError(f"queued resource {args.name} is {state or 'unknown'}: {res.stderr.strip()[:300]}")
    announce(f"queued resource {args.name}: {state}; waiting")
    time.sleep(_ACTIVE_POLL_S)


def _run_step(argv: list[str], name: str, retries: int) -> int:
  code = common.preempted_exit_code()
  for attempt in range(retries + 1):
    rc = _call(argv, check=False)
    if rc != code or attempt == retries:
      if rc:
        announce(f"error: {name}: exit code {rc}")
      return rc
    announce(f"{name}: preempted (exit {rc}); rerunning ({attempt + 1} of {retries}), resuming from its checkpoint")
  return rc

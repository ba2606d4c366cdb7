"""`sleep-jax launch slurm`: write an sbatch script, submit it with sbatch.

The script asks for --nodes x --ntasks-per-node tasks and runs COMMAND under `srun` (one
process per task); each process initialises jax.distributed from Slurm's environment
(`sleep_jax.distributed`). A sweep becomes a job array, one element per unfinished point
running `sleep-jax sweep SWEEP --point $SLURM_ARRAY_TASK_ID`, plus a `--collect` job that
waits for the array (afterok). Preemption: Slurm sends SIGTERM to the step (on preemption, or
--signal-grace seconds before the time limit); training saves a checkpoint and exits 75; the
script then requeues its own job (`scontrol requeue`, at most --retries times), and the
requeued job resumes from that checkpoint. Script and logs go to --script-dir (default
RUN_DIR/slurm, or ROOT/slurm for a sweep); --wait blocks until the jobs finish.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time

from sleep_jax.launch import common
from sleep_jax.launch.common import LaunchError, announce

_POLL_S = 2.0


def add_arguments(p) -> None:
  p.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
  p.add_argument("--ntasks-per-node", type=int, default=1, help="processes per node (default 1; one per GPU/TPU host)")
  p.add_argument("--time", help="time limit per job, e.g. 02:00:00")
  p.add_argument("--partition")
  p.add_argument("--account")
  p.add_argument("--job-name", default="sleep-jax")
  p.add_argument("--cpus-per-task", type=int)
  p.add_argument("--gpus-per-node", help="e.g. 8 or a100:8")
  p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                 help="extra #SBATCH option, e.g. --sbatch-option=--mem=64G (repeatable)")
  p.add_argument("--signal-grace", type=int, default=120, metavar="S",
                 help="SIGTERM the step S seconds before the time limit, to checkpoint (default 120)")
  p.add_argument("--script-dir", help="where the sbatch scripts and job logs go")
  p.add_argument("--wait", action="store_true", help="wait for the jobs to finish; fail if one failed")
  common.add_common_arguments(
      p, entrypoint=common.local_entrypoint(), retries=3,
      retries_help="requeue a job at most N times after preemption (exit 75) (default 3)")


def directive(option: str) -> str:
  """One `#SBATCH` line. sbatch splits these lines itself (quotes and backslashes, no shell),
  so values are quoted, and newlines and backslashes, which it reads differently, refused."""
  if not option.startswith("-") or any(c in option for c in "\n\r\0\\"):
    raise LaunchError(f"sbatch option {option!r} must start with '-' and contain no newline or backslash")
  flag, sep, value = option.partition("=")
  return f"#SBATCH {flag}" + (f"={shlex.quote(value)}" if sep else "")


def script(options: list[str], step: str, *, workdir: str, env: dict[str, str], max_requeues: int,
           note: str) -> str:
  """The batch script; `step` is the srun command line, already quoted."""
  code = common.preempted_exit_code()
  lines = ["#!/bin/bash", f"# Written by `sleep-jax launch slurm` ({note}). Resubmit with: sbatch THIS_FILE",
           *map(directive, options), "set -u", f"cd {shlex.quote(workdir)}", "export PYTHONUNBUFFERED=1",
           *(f"export {k}={shlex.quote(v)}" for k, v in env.items())]
  return "\n".join(lines) + f"""
# An array element's own id: one element shares SLURM_JOB_ID with the whole array, and
# requeueing that id would requeue every element.
job=${{SLURM_ARRAY_JOB_ID:+${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID:-}}}}
job=${{job:-$SLURM_JOB_ID}}
restarts=${{SLURM_RESTART_COUNT:-0}}
echo "sleep-jax: job $job on $(hostname), start $((restarts + 1)), $(date '+%F %T')"
# Preemption may signal this shell as well as the step: outlive it, so the step's exit code
# ({code} after its checkpoint) decides what happens next.
trap 'echo "sleep-jax: batch shell got SIGTERM; waiting for the step" >&2' TERM
{step} &
step=$!
while kill -0 "$step" 2>/dev/null; do wait "$step"; done
wait "$step"
rc=$?
if [ "$rc" -eq {code} ]; then
  if [ "$restarts" -lt {max_requeues} ]; then
    echo "sleep-jax: preempted (exit {code}, checkpoint saved); requeueing $job ($((restarts + 1)) of {max_requeues})"
    scontrol requeue "$job"
  else
    echo "sleep-jax: preempted, but requeued {max_requeues} times already; giving up"
  fi
fi
echo "sleep-jax: step exited with code $rc"
exit "$rc"
"""


def _options(args, *, name: str, out: str, array: str | None, tasks: tuple[int, int], big=True) -> list[str]:
  """#SBATCH options; `big=False` (collect, --list) leaves out the accelerators and CPUs."""
  opts = [f"--job-name={name}", f"--nodes={tasks[0]}", f"--ntasks-per-node={tasks[1]}"]
  for flag, value in (("--time", args.time), ("--partition", args.partition), ("--account", args.account),
                      ("--cpus-per-task", args.cpus_per_task if big else None),
                      ("--gpus-per-node", args.gpus_per_node if big else None)):
    if value is not None:
      opts.append(f"{flag}={value}")
  opts += ["--requeue", "--open-mode=append", f"--signal=TERM@{args.signal_grace}", f"--output={out}"]
  if array is not None:
    opts.append(f"--array={array}")
  return opts + list(args.sbatch_option)


def run(args, job: common.Job) -> int:
  if args.nodes < 1 or args.ntasks_per_node < 1 or args.retries < 0:
    raise LaunchError("--nodes and --ntasks-per-node must be >= 1, --retries >= 0")
  entry, env = common.entry_argv(args), common.env_pairs(args.env)
  common.check_argv(args.sbatch_option)
  if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.job_name):
    raise LaunchError(f"--job-name {args.job_name!r}: use letters, digits and _.+- only")
  base = job.sweep.root if job.collect else job.units[0].run_dir if job.units else None
  sdir = os.path.abspath(args.script_dir or os.path.join(base or "runs", "slurm"))
  stamp = time.strftime("%Y%m%d-%H%M%S")
  workdir, srun = os.getcwd(), ["srun", "--kill-on-bad-exit=1"]
  scripts = []  # (path, text, extra sbatch args)
  if job.collect is not None:
    if job.done_points:
      announce(f"sweep points already done, not submitted: {', '.join(map(str, job.done_points))}")
    if job.points:
      step = common.shell_line(srun + entry + job.sweep_argv + ["--point"]) + ' "$SLURM_ARRAY_TASK_ID"'
      opts = _options(args, name=args.job_name, out=os.path.join(sdir, "%x-%A_%a.out"),
                      array=",".join(map(str, job.points)), tasks=(args.nodes, args.ntasks_per_node))
      scripts.append((os.path.join(sdir, f"{args.job_name}-{stamp}.sbatch"),
                      script(opts, step, workdir=workdir, env=env, max_requeues=args.retries,
                             note=f"sweep {job.sweep.name}, points {','.join(map(str, job.points))}"), []))
    opts = _options(args, name=f"{args.job_name}-collect", out=os.path.join(sdir, "%x-%j.out"), array=None,
                    tasks=(1, 1), big=False)
    scripts.append((os.path.join(sdir, f"{args.job_name}-{stamp}-collect.sbatch"),
                    script(opts, common.shell_line(srun + entry + job.collect.argv), workdir=workdir, env=env,
                           max_requeues=args.retries, note=f"collect sweep {job.sweep.name}"),
                    ["--dependency=afterok:{prev}", "--kill-on-invalid-dep=yes"] if job.points else []))
  else:
    unit = job.units[0]
    n = (args.nodes, args.ntasks_per_node) if unit.distributed else (1, 1)
    opts = _options(args, name=args.job_name, out=os.path.join(sdir, "%x-%j.out"), array=None, tasks=n,
                    big=unit.distributed)
    scripts.append((os.path.join(sdir, f"{args.job_name}-{stamp}.sbatch"),
                    script(opts, common.shell_line(srun + entry + unit.argv), workdir=workdir, env=env,
                           max_requeues=args.retries, note=unit.name), []))
  ids: list[str] = []
  for path, text, extra in scripts:
    argv = ["sbatch", "--parsable", *(e.format(prev=ids[-1] if ids else "JOBID") for e in extra), path]
    if args.dry_run:
      common.print_file(path, text)
      common.print_command(argv, "JOBID: the id the sbatch above prints" if extra else "")
      continue
    common.write_file(path, text, mode=0o755)
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode:
      raise LaunchError(f"sbatch failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    ids.append(res.stdout.strip().split(";")[0])
    print(ids[-1], flush=True)
    announce(f"submitted job {ids[-1]}: {path} (logs in {sdir})")
  if args.dry_run or not args.wait:
    return 0
  return wait(ids)


def job_states(job_id: str) -> dict[str, dict[str, str]]:
  """{job (or array element) id: {JobState, ExitCode, Restarts, ...}} from `scontrol show job`."""
  res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
  out = {}
  for line in res.stdout.splitlines():
    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
    if "ArrayTaskId" in fields:
      out[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields
    elif "JobId" in fields:
      out[fields["JobId"]] = fields
  return out


def wait(ids: list[str]) -> int:
  """Poll squeue until the jobs leave it; 0 when every job (and array element) completed."""
  while subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True,
                       text=True).stdout.strip():
    time.sleep(_POLL_S)
  rc = 0
  for job_id in ids:
    for jid, f in sorted(job_states(job_id).items()):
      announce(f"job {jid}: {f.get('JobState')} exit {f.get('ExitCode')} restarts {f.get('Restarts')}")
      if f.get("JobState") != "COMPLETED":
        rc = 1
  return rc

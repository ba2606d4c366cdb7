"""`sleep-jax launch BACKEND [options] -- COMMAND...`: run a sleep-jax command on a backend.

Backends: local (P processes x D fake CPU devices here), slurm (an sbatch script, requeued on
preemption), tpu-vm (gcloud TPU VMs, queued resources for spot), xpk (GKE JobSets). COMMAND
is a sleep-jax sub-command; a `sweep SWEEP.yaml` without --point fans out to one job (array
element) per unfinished point and collects afterwards. `--dry-run` prints every command and
file instead of running it.
"""

from __future__ import annotations

import argparse
import importlib

from sleep_jax.launch import common

BACKENDS = {
    "local": ("sleep_jax.launch.local", "P processes x D fake CPU devices on this machine (jax.distributed over loopback)"),
    "slurm": ("sleep_jax.launch.slurm", "write and submit an sbatch script (arrays for sweeps, requeue on preemption)"),
    "tpu-vm": ("sleep_jax.launch.tpu_vm", "Cloud TPU VMs with gcloud: create (or queued spot), ssh --worker=all, delete"),
    "xpk": ("sleep_jax.launch.xpk", "xpk workload create on a GKE cluster (multislice, restarts on preemption)"),
}

EPILOG = """examples:
  sleep-jax launch local -n 2 -d 4 -- train experiments/tiny.yaml train.steps=20
  sleep-jax launch slurm --nodes 2 --time 02:00:00 --partition gpu -- sweep experiments/sweeps/tiny_passes.yaml
  sleep-jax launch tpu-vm --name pod1 --zone us-central2-b --tpu-type v4-32 --spot --dry-run -- train cfg.yaml
  sleep-jax launch xpk --cluster c1 --tpu-type v5litepod-256 --num-slices 2 --docker-image IMG -- train cfg.yaml
"""


def cmd_launch(args) -> int:
  module = importlib.import_module(BACKENDS[args.backend][0])
  job = common.parse_command(args.command)
  return module.run(args, job)


def register(subparsers) -> None:
  p = subparsers.add_parser("launch", help="run a sleep-jax command locally, on Slurm, on TPU VMs or with xpk",
                            description=__doc__.split("\n\n")[1], epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="backend", required=True, metavar="BACKEND")
  for name, (module, help_) in BACKENDS.items():
    mod = importlib.import_module(module)
    b = sub.add_parser(name, help=help_, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(b)
    b.set_defaults(func=cmd_launch)

#!/usr/bin/env bash
# Submit a sleep-jax command to Slurm; a sweep becomes a job array (one element per point).
#   launch/slurm.sh NODES TASKS_PER_NODE TIME COMMAND...
#   launch/slurm.sh 2 4 04:00:00 sweep experiments/sweeps/tiny_passes.yaml
# One task per GPU (or per host); preempted jobs requeue themselves and resume.
# Environment: PARTITION, ACCOUNT, GPUS_PER_NODE, RETRIES (requeues, default 3), WAIT=1
# (block until done), DRY_RUN=1 (print the script and the sbatch command, submit nothing).
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,7p' "$0" >&2; exit 2; fi
nodes=$1 tasks=$2 time=$3
shift 3
args=(--nodes "$nodes" --ntasks-per-node "$tasks" --time "$time" --retries "${RETRIES:-3}")
if [ -n "${PARTITION:-}" ]; then args+=(--partition "$PARTITION"); fi
if [ -n "${ACCOUNT:-}" ]; then args+=(--account "$ACCOUNT"); fi
if [ -n "${GPUS_PER_NODE:-}" ]; then args+=(--gpus-per-node "$GPUS_PER_NODE"); fi
if [ -n "${WAIT:-}" ]; then args+=(--wait); fi
if [ -n "${DRY_RUN:-}" ]; then args+=(--dry-run); fi
here=$(cd "$(dirname "$0")/.." && pwd)
sleep_jax=$(command -v sleep-jax || echo "$here/.venv/bin/sleep-jax")
exec "$sleep_jax" launch slurm "${args[@]}" -- "$@"

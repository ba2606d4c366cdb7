#!/usr/bin/env bash
# Run a sleep-jax command on a Cloud TPU pod slice: create it, run on every worker, delete it.
#   launch/tpu_pod.sh NAME ZONE TPU_TYPE COMMAND...
#   launch/tpu_pod.sh pod1 us-central2-b v4-32 train experiments/tiny.yaml mesh.fsdp=4
# Environment: PROJECT, SPOT=1 (queued resource, spot capacity), KEEP=1 (do not delete),
# REUSE=1 (the TPU VM exists already), WORKDIR (checkout on the workers), SETUP (shell text
# run on every worker first, e.g. 'pip install -e .'), RETRIES, DRY_RUN=1 (print, run nothing).
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,8p' "$0" >&2; exit 2; fi
name=$1 zone=$2 type=$3
shift 3
args=(--name "$name" --zone "$zone" --tpu-type "$type" --retries "${RETRIES:-0}")
if [ -n "${PROJECT:-}" ]; then args+=(--project "$PROJECT"); fi
if [ -n "${SPOT:-}" ]; then args+=(--spot); fi
if [ -n "${REUSE:-}" ]; then args+=(--reuse); elif [ -z "${KEEP:-}" ]; then args+=(--delete); fi
if [ -n "${WORKDIR:-}" ]; then args+=(--workdir "$WORKDIR"); fi
if [ -n "${SETUP:-}" ]; then args+=(--setup "$SETUP"); fi
if [ -n "${DRY_RUN:-}" ]; then args+=(--dry-run); fi
here=$(cd "$(dirname "$0")/.." && pwd)
sleep_jax=$(command -v sleep-jax || echo "$here/.venv/bin/sleep-jax")
exec "$sleep_jax" launch tpu-vm "${args[@]}" -- "$@"
